"""The main job: data -> split -> features -> train (Lightning) -> evaluate -> bundle.

``train(cfg)`` is what ``scripts/train.py`` runs under Hydra; tests call it with a
config composed by ``hydra.compose``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from retrieval.encoding import FeatureColumns
from towers.data.datamodule import TwoTowerDataModule
from towers.data.prepare import FeatureSettings, PreparedData, prepare_data
from towers.data.sources import load_data
from towers.data.split import make_split, prepare_interactions
from towers.evaluation.callback import RankingEvaluation, evaluate_module
from towers.evaluation.ranking import evaluate_popularity
from towers.export.bundle import export_bundle
from towers.model.module import TwoTowerModule
from towers.model.towers import TowerSpec

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


@dataclass
class TrainResult:
    """What a run produced."""

    metrics: dict[str, float]
    module: TwoTowerModule
    data: PreparedData
    bundle: Path
    output_dir: Path


def _columns(cfg: Any) -> FeatureColumns | None:
    if cfg is None:
        return None
    return FeatureColumns(**{k: list(v) for k, v in dict(cfg).items()})


def feature_settings(cfg: DictConfig) -> FeatureSettings:
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    item_columns, user_columns = values.pop("item_columns", None), values.pop("user_columns", None)
    return FeatureSettings(
        **values, item_columns=_columns(item_columns), user_columns=_columns(user_columns)
    )


def prepare(cfg: DictConfig) -> PreparedData:
    """Load, split and encode the data named by ``cfg.data``."""
    raw = load_data(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    events = prepare_interactions(raw.interactions, cfg.data.get("min_rating"))
    split = make_split(events, **cfg.split, seed=cfg.seed)
    data = prepare_data(raw, split, feature_settings(cfg.features))
    log.info("split %s", data.info)
    return data


def evaluate_all(module: TwoTowerModule, data: PreparedData, ks: list[int]) -> dict[str, float]:
    """Validation and test metrics of the model and of popularity."""
    metrics: dict[str, float] = {}
    for stage, eval_set in (("val", data.validation), ("test", data.test)):
        metrics.update(evaluate_module(module, data.catalogue_inputs, eval_set, ks, f"{stage}/"))
        metrics.update(evaluate_popularity(eval_set, ks, f"{stage}_popularity/"))
    return metrics


def train(cfg: DictConfig, output_dir: str | Path | None = None) -> TrainResult:
    """Run the whole job; writes ``metrics.json``, TensorBoard logs, checkpoints and the bundle."""
    out = Path(output_dir or cfg.export.bundle_dir).resolve()
    if output_dir is None:
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    data = prepare(cfg)
    spec = TowerSpec.from_encoders(data.encoders).to_dict()
    module: TwoTowerModule = hydra.utils.instantiate(
        cfg.model, spec=spec, n_catalogue_items=data.n_items
    )
    module.set_item_log_q(data.item_log_q)
    ks = list(cfg.eval.ks)
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        monitor="val/recall@20",
        mode="max",
        save_last=True,
        filename="epoch{epoch:02d}",
        auto_insert_metric_name=False,
    )
    callbacks = [
        RankingEvaluation(
            data.catalogue_inputs, data.validation, ks, cfg.train.eval_every_n_epochs
        ),
        checkpoint,
        EarlyStopping(
            monitor="val/recall@20",
            mode="max",
            patience=cfg.train.early_stopping_patience,
            check_on_train_epoch_end=True,
            strict=False,
        ),
    ]
    logger = TensorBoardLogger(save_dir=str(out), name="tensorboard", default_hp_metric=False)
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    trainer.fit(module, datamodule=TwoTowerDataModule(data, cfg.train.batch_size, cfg.seed))
    if checkpoint.best_model_path:
        log.info(
            "best checkpoint %s (val/recall@20 %.4f)",
            checkpoint.best_model_path,
            checkpoint.best_model_score,
        )
        module = TwoTowerModule.load_from_checkpoint(
            checkpoint.best_model_path, map_location="cpu", weights_only=False
        )
    metrics = evaluate_all(module, data, ks)
    logger.log_metrics(
        {k: v for k, v in metrics.items() if not k.endswith("users")}, step=trainer.global_step
    )
    bundle_dir = Path(cfg.export.bundle_dir) if output_dir is None else out / "bundle"
    config = OmegaConf.to_container(cfg, resolve=False)
    bundle = export_bundle(
        module,
        data,
        bundle_dir,
        index_factory=cfg.export.index,
        config=config,
        metrics=metrics,  # type: ignore[arg-type]
    )
    (out / METRICS_FILE).write_text(
        json.dumps({**metrics, "split": data.info}, indent=2, default=str)
    )
    return TrainResult(metrics, module, data, bundle, out)
