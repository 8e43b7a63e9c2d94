"""Shared fixtures: tiny synthetic data, a trained tiny bundle, the MovieLens folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from towers.data.schema import RawData
from towers.data.synthetic import generate_synthetic
from towers.pipeline import TrainResult

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
DATASETS = Path(os.environ.get("TWOTOWER_DATASETS", ROOT.parent / "shared" / "datasets"))

TINY_OVERRIDES = [
    "experiment=quick",
    "trainer.max_epochs=6",
    "trainer.enable_progress_bar=false",
    "export.latest=null",
]


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """The real Hydra config, as ``twotower train`` would see it, with overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


def served_test_metrics(result: TrainResult) -> dict[str, float]:
    """The run's test metrics as its bundle serves them: every test user's top 50 through
    ``Retriever.recommend``, scored by the pipeline's metric code."""
    from retrieval import Retriever
    from towers.evaluation.metrics import ranking_metrics

    retriever = Retriever.load(result.bundle)
    test = result.data.test
    rows = {item: row for row, item in enumerate(retriever.item_ids)}
    top = np.array(
        [[rows[i] for i in retriever.recommend(user_id=u, k=50)[0]] for u in test.user_ids]
    )
    return ranking_metrics(top, test.target_users, test.target_items, len(rows))


def dataset_dir(name: str) -> Path:
    """A MovieLens folder under TWOTOWER_DATASETS, or skip the test with the reason."""
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} not found: set TWOTOWER_DATASETS to the folder holding {name}/")
    return path


@pytest.fixture(autouse=True)
def own_state_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test's ``twotower serve`` keeps its default state directory
    (``$XDG_STATE_HOME/twotower``) to itself, never in the user's home: a server replays
    the state directory's log on start."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))


@pytest.fixture
def tiny_data() -> RawData:
    return generate_synthetic(n_users=120, n_items=80, mean_events_per_user=15, seed=3)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One tiny end-to-end run (train -> evaluate -> bundle), shared by the tests that read it."""
    from towers.pipeline import train

    out = tmp_path_factory.mktemp("run")
    result = train(compose_config([*TINY_OVERRIDES, f"paths.output_dir={out}"]))
    assert result is not None
    return result


# one bundle per index type: exact, IVF, HNSW and IVF-PQ with exact re-ranking
INDEXES = ["Flat", "IVF8,Flat", "HNSW16", "IVF4,PQ8x4,RFlat"]


@pytest.fixture(scope="session")
def bundles(trained: TrainResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny run's model exported once per index type in :data:`INDEXES`."""
    from towers.export.bundle import ExportSettings, export_bundle

    root = tmp_path_factory.mktemp("bundles")
    return {
        factory: export_bundle(
            trained.module,
            trained.data,
            root / factory.replace(",", "_"),
            settings=ExportSettings(index=factory),
        )
        for factory in INDEXES
    }


# torch's gloo transport thread (pt_gloo_runloop) now and then segfaults on CPU (seen in
# about 1 run of 10 of the two-process tests with torch 2.13; the kernel log shows
# "pt_gloo_runloop ... segfault"); the surviving process then fails with a reset
# connection. The DDP tests run once more when that is how they failed.
GLOO_CRASH = ("Connection reset by peer", "Signal 11 (SIGSEGV)", "exitcode: -11")


def gloo_crashed(output: str) -> bool:
    """Whether a distributed run's output shows a process lost inside gloo."""
    return any(sign in output for sign in GLOO_CRASH)
