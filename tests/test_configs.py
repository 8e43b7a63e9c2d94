"""Every config in conf/ composes, and its objects instantiate."""

from __future__ import annotations

import hydra
import pytest
import pytorch_lightning as pl

from towers.data.prepare import FeatureSettings
from towers.model.module import TwoTowerModule
from towers.model.spec import TowerSpec
from towers.pipeline import feature_settings, model_config

from .conftest import CONF_DIR, compose_config

DATA_CONFIGS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
TRAINER_CONFIGS = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))
MODEL_CONFIGS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
LOGGER_CONFIGS = sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml"))
EXPERIMENT_CONFIGS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
SEARCH_CONFIGS = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))
SPEC = {
    "items": {
        "prefix": "item",
        "id_size": 10,
        "use_id": True,
        "categorical_sizes": [4],
        "bag_sizes": [5],
        "bag_widths": [3],
        "n_numeric": 1,
    },
    "users": {
        "prefix": "user",
        "id_size": 6,
        "use_id": True,
        "categorical_sizes": [],
        "bag_sizes": [],
        "bag_widths": [],
        "n_numeric": 0,
    },
    "history_length": 4,
}


def build(cfg) -> TwoTowerModule:
    """The module of a composed config, as the pipeline builds it."""
    return TwoTowerModule.from_config(model_config(cfg), TowerSpec.from_dict(SPEC), 8)


def test_a_misspelt_model_key_is_an_error() -> None:
    cfg = compose_config(["+model.temprature=0.2"])
    with pytest.raises(ValueError, match="temprature"):
        model_config(cfg)


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_data_configs_compose(data: str) -> None:
    cfg = compose_config([f"data={data}"])
    assert cfg.data.kind == data if data != "synthetic" else cfg.data.kind == "synthetic"
    assert isinstance(feature_settings(cfg.features), FeatureSettings)


@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_model_configs_instantiate(model: str) -> None:
    cfg = compose_config([f"model={model}"])
    module = build(cfg)
    assert isinstance(module, TwoTowerModule)
    assert module.configure_optimizers() is not None


@pytest.mark.parametrize("trainer", TRAINER_CONFIGS)
def test_trainer_configs_compose(trainer: str) -> None:
    cfg = compose_config([f"trainer={trainer}"])
    if cfg.trainer.accelerator == "cpu":
        assert isinstance(hydra.utils.instantiate(cfg.trainer, logger=False), pl.Trainer)
    else:
        assert cfg.trainer._target_ == "pytorch_lightning.Trainer"


@pytest.mark.parametrize("logger", LOGGER_CONFIGS)
def test_logger_configs_instantiate(logger: str, tmp_path) -> None:
    cfg = compose_config([f"logger={logger}", f"paths.output_dir={tmp_path}"])
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    assert all(isinstance(x, pl.loggers.Logger) for x in loggers)


@pytest.mark.parametrize("experiment", EXPERIMENT_CONFIGS)
def test_experiment_presets_compose_and_instantiate(experiment: str) -> None:
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.data.kind
    assert isinstance(feature_settings(cfg.features), FeatureSettings)
    module = build(cfg)
    assert isinstance(module, TwoTowerModule)


@pytest.mark.parametrize("search", SEARCH_CONFIGS)
def test_hparams_search_presets_compose(search: str) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_.lower()
    assert sweeper.direction == "maximize" and cfg.optimized_metric.startswith("val/")
    assert all(key.split(".")[0] in ("model", "features", "train") for key in sweeper.params)


def test_sweeps_tune_one_tower_pair_even_over_an_ensemble_preset() -> None:
    preset = compose_config(["experiment=movielens_latest"])
    assert preset.model.ensemble > 1
    swept = compose_config(["experiment=movielens_latest", "hparams_search=optuna"])
    assert swept.model.ensemble == 1 and swept.model.logq_weight == preset.model.logq_weight


@pytest.mark.parametrize("experiment", ["movielens_100k", "movielens_latest"])
def test_movielens_presets_and_cold_runs_give_history_items_attributes_not_baselines(
    experiment: str,
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_quality", CONF_DIR.parent / "benchmarks" / "bench_quality.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    preset = compose_config([f"experiment={experiment}"])
    assert preset.model.history_attributes
    assert dict(preset.features.item_columns) == {"multi_hot": ["genres"], "numeric": ["year"]}
    cold = compose_config(
        [f"experiment={experiment}", *bench.COLD_TWOTOWER, *bench.MOVIELENS_COLD_TWOTOWER]
    )
    assert cold.model.history_attributes and not cold.features.use_item_id
    assert cold.model.ensemble == 1 and cold.model.logq_weight == 1.0
    assert list(cold.features.item_columns.text) == ["title"] and cold.features.text_min_count > 1
    baselines = compose_config([f"experiment={experiment}", *bench.BASELINE_FEATURES])
    assert baselines.features.item_columns is None  # the reader's columns, titles included
