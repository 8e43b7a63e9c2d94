"""The main job: data -> split -> features -> train (Lightning) -> evaluate -> bundle.

``train(cfg)`` is what ``twotower train`` runs under Hydra; tests call it with a
config composed by ``hydra.compose`` (setting ``paths.output_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from towers.config import absolute_paths
from towers.data.datamodule import TwoTowerDataModule
from towers.data.prepare import FeatureSettings, PreparedData, prepare_data
from towers.data.prepared_dir import load_prepared, read_prepared_manifest
from towers.data.readers import load_user_table
from towers.data.samples import user_activity_weights
from towers.data.schema import ITEM_ID, RawData
from towers.data.shard_stream import GROUP_SHARDS, ShardBatches
from towers.data.sources import load_data
from towers.data.split import make_split, prepare_interactions, recent_window
from towers.evaluation.callback import RankingEvaluation, evaluate_module, tower_scorer
from towers.evaluation.ranking import evaluate_popularity, evaluate_stream
from towers.export.bundle import ExportSettings, export_bundle
from towers.logs import quiet_lightning
from towers.model.module import TwoTowerModule, embed
from towers.model.spec import ModelConfig, TowerSpec
from towers.model.warm_start import ShrinkPerturb, WarmStartError, check_source, warm_start
from towers.tensorboard import log_hparams, log_item_projector
from twotower.encoding import FeatureColumns
from twotower.errors import PreparedDataError
from twotower.storage import check_upload_target, upload_tree

log = logging.getLogger(__name__)
quiet_lightning()
METRICS_FILE = "metrics.json"
MONITOR = "val/recall@20"


@dataclass
class TrainResult:
    """What a run produced."""

    metrics: dict[str, float]
    module: TwoTowerModule
    data: PreparedData
    bundle: Path | str  # a URL when export.bundle_dir is one
    output_dir: Path
    best_checkpoint: Path | None


def _columns(cfg: Any) -> FeatureColumns | None:
    if cfg is None:
        return None
    return FeatureColumns(**{k: list(v) for k, v in dict(cfg).items()})


def resolved_yaml(cfg: DictConfig) -> str:
    """The config as YAML, interpolations resolved where they can be."""
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run
        return OmegaConf.to_yaml(cfg)


def feature_settings(cfg: DictConfig) -> FeatureSettings:
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    item_columns, user_columns = values.pop("item_columns", None), values.pop("user_columns", None)
    return FeatureSettings(
        **values, item_columns=_columns(item_columns), user_columns=_columns(user_columns)
    )


def export_settings(cfg: DictConfig) -> ExportSettings:
    values = OmegaConf.to_container(cfg.export, resolve=True)
    assert isinstance(values, dict)
    values.pop("bundle_dir", None)
    return ExportSettings(**values)


def split_settings(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.split`` as ``make_split`` keywords; configs without ``split.seed`` use ``seed``."""
    settings = dict(OmegaConf.to_container(cfg.split, resolve=True))  # type: ignore[arg-type]
    settings.setdefault("seed", cfg.seed)
    return settings


@contextmanager
def timed(timings: dict[str, float] | None, stage: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[stage]`` (when given)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def prepared_directory(cfg: DictConfig) -> str | None:
    """``data.prepared``: the ``twotower prepare`` (or ``spark prepare``) output to train
    from, or None."""
    value = cfg.data.get("prepared")
    return str(value) if value else None


def check_prepared(
    cfg: DictConfig, directory: str, fit_on: str = "fit", warn: bool = True
) -> dict[str, Any]:
    """The prepared directory's manifest, after refusing what it cannot serve: a
    directory that is not a prepared one, ``train.window_days`` (its split is fixed), a
    data kind other than ``csv``, and training on all of train (``train.refit``) from a
    directory prepared on the fit part only. ``warn``: log the split and feature
    settings the run's config sets otherwise (the directory's are used)."""
    where = f"data.prepared={directory}"
    if cfg.train.get("window_days") is not None:
        raise PreparedDataError(
            f"{where}: train.window_days cannot apply to a prepared directory (its split "
            "is fixed): prepare the window's interactions with `twotower prepare`, "
            "or unset train.window_days"
        )
    if cfg.data.get("kind") != "csv":
        raise PreparedDataError(
            f"{where}: needs data=csv (data={cfg.data.get('kind')} reads its own tables); "
            "the user table, if any, is data.users"
        )
    manifest = read_prepared_manifest(directory)
    if manifest["trained_on"] == "fit" and (fit_on == "train" or cfg.train.get("refit")):
        raise PreparedDataError(
            f"{where}: train.refit=true trains again on all of train, but this directory "
            "was prepared on the fit part only (trained_on: fit): prepare it with "
            "`twotower prepare --fit-on train` (or `twotower spark prepare`), or set "
            "train.refit=false"
        )
    if not warn:
        return manifest
    if manifest["trained_on"] == "train" and fit_on == "fit":
        log.warning(
            "%s was prepared on all of train (--fit-on train): the model trains on the "
            "validation events too, so validation metrics (and early stopping) are on "
            "seen data",
            where,
        )
    ignored = [f"data.{key}" for key in ("interactions", "items") if cfg.data.get(key)]
    if ignored:
        log.warning("%s: %s not read (the directory holds the data)", where, ", ".join(ignored))
    differing = differing_settings(cfg, manifest.get("settings") or {})
    if differing:
        log.warning(
            "%s: the directory was prepared with %s; its split and features are used",
            where,
            ", ".join(differing),
        )
    return manifest


def differing_settings(cfg: DictConfig, prepared: dict[str, Any]) -> list[str]:
    """``key=value (config: value)`` for each split and feature setting (and
    ``data.min_rating``) that the prepared directory's ``settings`` set otherwise."""
    split = split_settings(cfg)
    ours: dict[str, Any] = {f"split.{k}": v for k, v in split.items()}
    if not split.get("cold_items"):  # the draw's settings do not matter then
        ours.pop("split.seed", None)
        ours.pop("split.cold_fraction", None)
    features = OmegaConf.to_container(cfg.features, resolve=True)
    assert isinstance(features, dict)
    ours.update(
        {
            f"features.{k}": v
            for k, v in features.items()
            if k not in ("item_columns", "user_columns")
        }
    )
    ours["data.min_rating"] = cfg.data.get("min_rating")
    theirs = {f"split.{k}": v for k, v in prepared.items() if k != "features"}
    theirs.update({f"features.{k}": v for k, v in (prepared.get("features") or {}).items()})
    theirs["data.min_rating"] = prepared.get("min_rating")
    return [
        f"{key}={theirs[key]} (config: {value})"
        for key, value in ours.items()
        if key in theirs and theirs[key] != value
    ]


def prepared_users(cfg: DictConfig) -> pd.DataFrame | None:
    """The user table of ``cfg.data`` (``data.users``, renamed by ``data.columns`` and
    validated as :func:`towers.data.readers.load_tables` does), or None; the
    interactions and the item table are not read."""
    users = cfg.data.get("users")
    if not users:
        return None
    columns = {k: v for k, v in dict(cfg.data.get("columns") or {}).items() if v}
    return load_user_table(str(users), columns)


def prepare(
    cfg: DictConfig,
    fit_on: str = "fit",
    timings: dict[str, float] | None = None,
    raw: RawData | Future[RawData] | None = None,
) -> PreparedData:
    """Load, split and encode the data named by ``cfg.data`` (see ``prepare_data``);
    ``timings`` collects the seconds of each step; ``raw``: the tables of ``cfg.data``
    already loaded, or being loaded (:func:`towers.data.sources.load_data_in_background`).
    With ``data.prepared=DIR``: the split, encoders, catalogue and samples of ``DIR``
    (:func:`towers.data.prepared_dir.load_prepared`; ``fit_on`` must be what it was
    prepared on, or ``"fit"``), with the user table of ``cfg.data`` (of ``raw`` when
    given); the interactions are not read."""
    directory = prepared_directory(cfg)
    if directory is not None:
        check_prepared(cfg, directory, fit_on)
        with timed(timings, "load"):
            if isinstance(raw, Future):
                raw = raw.result()
            users = raw.users if raw is not None else prepared_users(cfg)
            data = load_prepared(
                directory, users, str(cfg.data.kind), stream=bool(cfg.data.get("stream"))
            )
        log.info("split %s", data.info)
        return data
    with timed(timings, "load"):
        if isinstance(raw, Future):
            raw = raw.result()
        if raw is None:
            raw = load_data(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    with timed(timings, "split"):
        interactions = raw.interactions
        window_days = cfg.train.get("window_days")
        if window_days is not None:
            interactions = recent_window(interactions, float(window_days))
        events = prepare_interactions(interactions, cfg.data.get("min_rating"))
        split = make_split(events, **split_settings(cfg))
    with timed(timings, "features"):
        data = prepare_data(raw, split, feature_settings(cfg.features), fit_on)
    log.info("split %s", data.info)
    return data


def evaluate_all(module: TwoTowerModule, data: PreparedData, ks: list[int]) -> dict[str, float]:
    """Validation and test metrics of the model and of popularity (users streamed a
    piece at a time: :func:`towers.evaluation.ranking.evaluate_stream`)."""
    metrics: dict[str, float] = {}
    item_vectors = embed(module.model.item_tower, data.catalogue_inputs)  # once for both sets
    scorer = tower_scorer(module.model.user_tower, item_vectors)
    for stage, source in (("val", data.validation_source), ("test", data.test_source)):
        metrics.update(evaluate_stream(source, scorer, len(item_vectors), ks, f"{stage}/"))
        metrics.update(evaluate_popularity(source, ks, f"{stage}_popularity/"))
    return metrics


def model_config(cfg: DictConfig) -> ModelConfig:
    """``cfg.model`` as the typed :class:`ModelConfig` (the one way it reaches code)."""
    values = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(values, dict)
    return ModelConfig.from_config(values)


def build_datamodule(cfg: DictConfig, data: PreparedData) -> TwoTowerDataModule:
    """Training batches as ``cfg.train`` and ``cfg.model`` ask: from the samples in
    memory, or streamed from a prepared directory's shards (``data.stream``)."""
    power = float(cfg.train.user_weight_power)
    if data.sample_stream is not None:
        batches = ShardBatches(
            data.sample_stream,
            data.encoders.user_input_names,
            data.catalogue_inputs,
            data.encoders.history_length,
            model_config(cfg).mixed_negatives,
            cfg.seed,
            cfg.train.target_horizon,
            power,
            int(cfg.data.get("stream_group_shards", GROUP_SHARDS)),
        )
        return TwoTowerDataModule(batches, cfg.train.batch_size, cfg.seed)
    if power:
        weights = data.sample_weights * user_activity_weights(data.sample_histories.starts, power)
        data = dataclasses.replace(data, sample_weights=weights)
    return TwoTowerDataModule.from_prepared(
        data,
        cfg.train.batch_size,
        cfg.seed,
        model_config(cfg).mixed_negatives,
        cfg.train.target_horizon,
    )


def build_module(cfg: DictConfig, data: PreparedData, negative_pool_size: int) -> TwoTowerModule:
    """The LightningModule from ``cfg.model``, sized for ``data``."""
    module = TwoTowerModule.from_config(
        model_config(cfg),
        TowerSpec.from_encoders(data.encoders),
        data.n_items,
        negative_pool_size,
        int(cfg.seed),
    )
    module.set_item_log_p(data.item_log_p)
    codes = data.encoders.items.ids.encode(data.catalogue[ITEM_ID])
    module.model.set_item_attributes(codes, data.catalogue_inputs)
    module.feature_encoders = data.encoders
    return module


def apply_init_from(cfg: DictConfig, module: TwoTowerModule, data: PreparedData) -> None:
    """Warm-start ``module`` from ``cfg.init_from``, when set: the previous model's weights,
    embedding rows matched by vocabulary entry (:mod:`towers.model.warm_start`); only the
    weights carry over, the optimiser and scheduler start afresh."""
    source = cfg.get("init_from")
    if source:
        warm_start(
            module, data.encoders, source, member=cfg.get("init_member"), blend=shrink_perturb(cfg)
        )


def shrink_perturb(cfg: DictConfig) -> ShrinkPerturb:
    """``cfg.init_shrink`` and ``cfg.init_perturb``, checked; either set away from 1 and 0
    without ``init_from`` is an error (there is nothing to shrink)."""
    values = {
        key: cfg.get(key, default) for key, default in (("init_shrink", 1.0), ("init_perturb", 0.0))
    }
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WarmStartError(f"{key} must be a number, got {value!r}")
    blend = ShrinkPerturb(float(values["init_shrink"]), float(values["init_perturb"]))
    if not blend.copies and not cfg.get("init_from"):
        raise WarmStartError(
            "init_shrink / init_perturb shrink and perturb the weights of a warm start: "
            "set init_from too"
        )
    return blend


def build_trainer(
    cfg: DictConfig, data: PreparedData, output_dir: Path
) -> tuple[pl.Trainer, ModelCheckpoint, list[Any]]:
    """Trainer with ranking evaluation, checkpointing and early stopping on val/recall@20."""
    ks = list(cfg.eval.ks)
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        monitor=MONITOR,
        mode="max",
        save_last=True,
        filename="epoch{epoch:02d}",
        auto_insert_metric_name=False,
        # a run into a directory that holds an earlier one's checkpoints replaces them
        # (Lightning would write last-v1.ckpt beside them, and init_from=RUN would read
        # the earlier run's last.ckpt)
        enable_version_counter=False,
    )
    callbacks: list[pl.Callback] = [
        RankingEvaluation(
            data.catalogue_inputs, data.validation_source, ks, cfg.train.eval_every_n_epochs
        ),
        checkpoint,
        EarlyStopping(
            monitor=MONITOR,
            mode="max",
            patience=cfg.train.early_stopping_patience,
            check_on_train_epoch_end=True,
            strict=False,
        ),
    ]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    return trainer, checkpoint, loggers


def refit_data_for(cfg: DictConfig, data: PreparedData) -> PreparedData:
    """The data a refit trains on (all of train): ``data`` itself when it already is
    (a prepared directory made ``--fit-on train``), else prepared again that way."""
    if data.info.get("trained_on") == "train":
        return data
    return prepare(cfg, fit_on="train")


def refit_on_train(
    cfg: DictConfig, best: Path, output_dir: Path, data: PreparedData | None = None
) -> tuple[TwoTowerModule, PreparedData, dict[str, float]]:
    """EVALUATION.md's protocol: with the epoch count chosen on validation, train again
    from scratch on all of train, and score that model on test (validation metrics stay
    those of the selection run, since validation is training data here). ``data``: the
    split prepared with ``fit_on="train"``, if already at hand."""
    import torch

    epochs = int(torch.load(best, map_location="cpu", weights_only=False)["epoch"]) + 1
    log.info(
        "refitting on all of train for %d epoch(s), the best epoch count on validation", epochs
    )
    pl.seed_everything(cfg.seed, workers=True)
    data = data or prepare(cfg, fit_on="train")
    module = train_for_epochs(cfg, data, epochs, output_dir / "checkpoints" / "refit")
    return (
        module,
        data,
        {**score_test(module, data, list(cfg.eval.ks)), "refit_epochs": float(epochs)},
    )


def train_for_epochs(
    cfg: DictConfig, data: PreparedData, epochs: int, checkpoint_dir: Path
) -> TwoTowerModule:
    """Train a new module (warm-started from ``cfg.init_from`` when set) on ``data`` for
    exactly ``epochs`` epochs, without validation or early stopping, in one process;
    ``checkpoint_dir/last.ckpt`` holds the result. Seed first (``pl.seed_everything``)
    for a reproducible run."""
    datamodule = build_datamodule(cfg, data)
    module = build_module(cfg, data, datamodule.negative_pool_size)
    apply_init_from(cfg, module, data)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_epochs=epochs,
        devices=1,  # the refit runs in one process, after any DDP selection run
        strategy="auto",
        logger=False,
        callbacks=[
            ModelCheckpoint(
                dirpath=checkpoint_dir,
                save_last=True,
                save_top_k=0,
                enable_version_counter=False,  # last.ckpt is this run's, not an earlier one's
            )
        ],
    )
    trainer.fit(module, datamodule=datamodule, weights_only=False)
    return module.cpu().eval()


def score_test(module: TwoTowerModule, data: PreparedData, ks: list[int]) -> dict[str, float]:
    """Test metrics of the model and of popularity."""
    test = evaluate_module(module, data.catalogue_inputs, data.test_source, ks, "test/")
    test.update(evaluate_popularity(data.test_source, ks, "test_popularity/"))
    return test


@dataclass
class Selection:
    """One training run's outcome: its best model on validation, and what made it."""

    module: TwoTowerModule
    data: PreparedData
    best: Path | None
    global_step: int
    loggers: list[Any]


def fit_and_select(
    cfg: DictConfig,
    out: Path,
    data: PreparedData | None = None,
    timings: dict[str, float] | None = None,
    raw: RawData | Future[RawData] | None = None,
) -> Selection | None:
    """Train on the fit split with early stopping; the best epoch's model on the CPU.
    None on DDP processes other than rank 0. ``data``: ``prepare(cfg)``, if at hand;
    ``raw``: the loaded (or loading) tables for it."""
    pl.seed_everything(cfg.seed, workers=True)
    data = data or prepare(cfg, timings=timings, raw=raw)
    datamodule = build_datamodule(cfg, data)
    module = build_module(cfg, data, datamodule.negative_pool_size)
    apply_init_from(cfg, module, data)
    trainer, checkpoint, loggers = build_trainer(cfg, data, out)
    # weights_only=False: our checkpoints hold the config (optimiser factory, spec) as hparams
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
    if not trainer.is_global_zero:
        return None
    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    if best is not None:
        log.info("best checkpoint %s (%s %.4f)", best, MONITOR, checkpoint.best_model_score)
        module = TwoTowerModule.load_from_checkpoint(best, map_location="cpu", weights_only=False)
    return Selection(module.cpu().eval(), data, best, trainer.global_step, loggers)


def member_config(cfg: DictConfig, index: int, out: Path) -> DictConfig:
    """Ensemble member ``index``: a single tower pair trained with seed ``seed + index``
    on the same split, writing under ``out/members/<index>``."""
    member = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    member.model.ensemble = 1
    member.split.seed = split_settings(cfg)["seed"]
    member.seed = int(cfg.seed) + index
    member.paths.output_dir = str(out / "members" / str(index))
    if member.get("init_from"):
        member.init_member = index  # starts from the same member of an ensemble run
    return member


def assemble(cfg: DictConfig, data: PreparedData, members: list[TwoTowerModule]) -> TwoTowerModule:
    """One module whose towers are the members' towers side by side (``model.ensemble``)."""
    module = build_module(cfg, data, members[0].hparams.negative_pool_size)
    for index, member in enumerate(members):
        for side in ("item_tower", "user_tower"):
            target = getattr(module.model, side).members[index]
            target.load_state_dict(getattr(member.model, side).state_dict())
    return module.cpu().eval()


def train_ensemble(
    cfg: DictConfig, out: Path, raw: RawData | Future[RawData] | None = None
) -> tuple[Selection, TwoTowerModule, dict] | None:
    """``model.ensemble=n``: n tower pairs trained as separate runs (seed, seed+1, ...; each
    with its own early stopping and refit) on data prepared once, assembled into one model;
    its metrics. None on DDP processes other than rank 0."""
    if cfg.get("ckpt_path"):
        raise ValueError("ckpt_path (resuming) is not supported with model.ensemble > 1")
    configs = [member_config(cfg, index, out) for index in range(int(cfg.model.ensemble))]
    data = prepare(cfg, raw=raw)  # the members share the split and the features
    selections = []
    for member_cfg in configs:
        log.info(
            "ensemble member %d/%d (seed %d)", len(selections) + 1, len(configs), member_cfg.seed
        )
        selections.append(fit_and_select(member_cfg, Path(member_cfg.paths.output_dir), data))
    if any(s is None for s in selections):
        return None
    chosen = [s for s in selections if s is not None]
    module = assemble(cfg, data, [s.module for s in chosen])
    metrics = evaluate_all(module, data, list(cfg.eval.ks))
    if cfg.train.get("refit") and all(s.best is not None for s in chosen):
        refit_data = refit_data_for(cfg, data)
        refits = [
            refit_on_train(member_cfg, s.best, Path(member_cfg.paths.output_dir), refit_data)  # type: ignore[arg-type]
            for member_cfg, s in zip(configs, chosen, strict=True)
        ]
        module = assemble(cfg, refit_data, [refit[0] for refit in refits])
        metrics.update(score_test(module, refit_data, list(cfg.eval.ks)))
        metrics["refit_epochs"] = float(np.mean([refit[2]["refit_epochs"] for refit in refits]))
        data = refit_data
    return dataclasses.replace(chosen[0], data=data), module, metrics


def train(cfg: DictConfig, raw: RawData | Future[RawData] | None = None) -> TrainResult | None:
    """Run the whole job; writes ``metrics.json``, logs, checkpoints and the bundle into
    ``cfg.paths.output_dir`` (then copies that directory to ``cfg.paths.upload_to``, an
    fsspec URL, when set). Returns None on DDP processes other than rank 0. ``raw``:
    the tables of ``cfg.data``, if already loaded or being loaded."""
    out = Path(cfg.paths.output_dir).resolve()
    absolute_paths(cfg, Path.cwd())
    shrink_perturb(cfg)  # before any work, as are the next checks
    if cfg.get("init_from"):
        check_source(cfg.init_from)  # a missing path fails at once
        if cfg.get("ckpt_path"):
            raise WarmStartError(
                "init_from (a warm start) and ckpt_path (resuming) exclude each other"
            )
    upload_to = cfg.paths.get("upload_to")
    if upload_to:
        check_upload_target(str(upload_to), out)  # fails before any work, not after it
    directory = prepared_directory(cfg)
    if directory is not None:
        check_prepared(cfg, directory, warn=False)  # an unusable directory fails at once
    elif cfg.data.get("stream"):
        raise PreparedDataError(
            "data.stream=true streams the training samples of a prepared directory: set "
            "data.prepared=DIR (`twotower prepare`'s output), or data.stream=false"
        )
    out.mkdir(parents=True, exist_ok=True)
    log.info("config:\n%s", resolved_yaml(cfg))
    timings: dict[str, float] = {}
    if int(cfg.model.get("ensemble", 1)) > 1:
        with timed(timings, "fit"):
            outcome = train_ensemble(cfg, out, raw)
        if outcome is None:
            return None
        selection, module, metrics = outcome
        data, best = selection.data, None
    else:
        started = time.perf_counter()
        chosen = fit_and_select(cfg, out, timings=timings, raw=raw)
        if chosen is None:
            return None
        timings["fit"] = time.perf_counter() - started - sum(timings.values())
        selection, module, data, best = chosen, chosen.module, chosen.data, chosen.best
        with timed(timings, "evaluate"):
            metrics = evaluate_all(module, data, list(cfg.eval.ks))
        if cfg.train.get("refit") and best is not None:
            with timed(timings, "refit"):
                module, data, test_metrics = refit_on_train(
                    cfg, best, out, refit_data_for(cfg, data)
                )
            metrics.update(test_metrics)
    config = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(config, dict)
    logging_started = time.perf_counter()
    for logger in selection.loggers:
        logger.log_metrics(
            {k: v for k, v in metrics.items() if not k.endswith("users")}, selection.global_step
        )
        if isinstance(logger, TensorBoardLogger):
            log_hparams(logger, config, metrics)
            item_vectors = embed(module.model.item_tower, data.catalogue_inputs)
            log_item_projector(
                logger, item_vectors, data.catalogue, data.encoders, cfg.train.projector_items
            )
        logger.finalize("success")
    timings["tensorboard"] = time.perf_counter() - logging_started
    with timed(timings, "export"):
        bundle = export_bundle(
            module,
            data,
            cfg.export.bundle_dir,
            settings=export_settings(cfg),
            config=config,
            metrics=metrics,
        )
    log.info("seconds: %s", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    (out / METRICS_FILE).write_text(
        json.dumps({**metrics, "split": data.info, "seconds": timings}, indent=2, default=str)
    )
    if upload_to:
        try:
            upload_tree(out, str(upload_to), last=METRICS_FILE)
        except Exception as exc:
            raise OSError(f"{upload_to}: the upload failed ({exc}); the run is in {out}") from exc
    return TrainResult(metrics, module, data, bundle, out, best)
