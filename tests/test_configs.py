"""Every config in conf/ composes, and its objects instantiate."""

from __future__ import annotations

import hydra
import pytest
import pytorch_lightning as pl

from towers.data.prepare import FeatureSettings
from towers.model.module import TwoTowerModule
from towers.pipeline import feature_settings

from .conftest import CONF_DIR, compose_config

DATA_CONFIGS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
TRAINER_CONFIGS = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))
MODEL_CONFIGS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
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


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_data_configs_compose(data: str) -> None:
    cfg = compose_config([f"data={data}"])
    assert cfg.data.kind == data if data != "synthetic" else cfg.data.kind == "synthetic"
    assert isinstance(feature_settings(cfg.features), FeatureSettings)


@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_model_configs_instantiate(model: str) -> None:
    cfg = compose_config([f"model={model}"])
    module = hydra.utils.instantiate(cfg.model, spec=SPEC, n_catalogue_items=8)
    assert isinstance(module, TwoTowerModule)
    assert module.configure_optimizers() is not None


@pytest.mark.parametrize("trainer", TRAINER_CONFIGS)
def test_trainer_configs_compose(trainer: str) -> None:
    cfg = compose_config([f"trainer={trainer}"])
    if cfg.trainer.accelerator == "cpu":
        assert isinstance(hydra.utils.instantiate(cfg.trainer, logger=False), pl.Trainer)
    else:
        assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
