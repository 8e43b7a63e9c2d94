"""Training round trips: best checkpoint reload, resume, DDP, sweeps (Lightning + Hydra)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from towers.model.module import TwoTowerModule
from towers.pipeline import (
    METRICS_FILE,
    TrainResult,
    build_datamodule,
    evaluate_all,
    prepare,
    train,
    train_for_epochs,
)

from .conftest import ROOT, TINY_OVERRIDES, compose_config, gloo_crashed


def test_best_checkpoint_reloads_to_the_same_metrics(trained: TrainResult) -> None:
    assert trained.best_checkpoint is not None and trained.best_checkpoint.is_file()
    module = TwoTowerModule.load_from_checkpoint(
        trained.best_checkpoint, map_location="cpu", weights_only=False
    )
    again = evaluate_all(module, trained.data, [10, 20, 50])
    for key, value in trained.metrics.items():
        assert abs(again[key] - value) <= 1e-6, key


def test_tensorboard_has_scalars_hparams_and_projector(trained: TrainResult) -> None:
    board = trained.output_dir / "tensorboard"
    assert any(board.rglob("events.out.tfevents*"))
    assert any(board.rglob("projector_config.pbtxt"))
    assert any(board.rglob("metadata.tsv"))


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    overrides = [
        *TINY_OVERRIDES,
        "logger=none",
        "train.early_stopping_patience=100",
        "model.dropout=0.2",
    ]
    full = train(
        compose_config(
            [*overrides, "trainer.max_epochs=3", f"paths.output_dir={tmp_path / 'full'}"]
        )
    )
    train(
        compose_config(
            [*overrides, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'part'}"]
        )
    )
    resumed = train(
        compose_config(
            [
                *overrides,
                "trainer.max_epochs=3",
                f"paths.output_dir={tmp_path / 'resumed'}",
                f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}",
            ]
        )
    )
    assert full is not None and resumed is not None
    last = [
        torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=False)
        for d in ("full", "resumed")
    ]
    assert last[0]["global_step"] == last[1]["global_step"]
    for name, tensor in last[0]["state_dict"].items():
        torch.testing.assert_close(last[1]["state_dict"][name], tensor, rtol=0, atol=0, msg=name)
    assert full.metrics["test/recall@20"] == resumed.metrics["test/recall@20"]


def failure_lines(stderr: str) -> str:
    """What each process said when it failed: the two processes share stderr, and a
    process that dies on its own shows up in the other only as a reset connection."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    blocks = ["\n".join(lines[i : i + 60][-25:]) for i in starts]
    return "\n---\n".join(blocks) or stderr[-3000:]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_single_process_evaluation(tmp_path: Path) -> None:
    overrides = [*TINY_OVERRIDES, "trainer=ddp", "trainer.max_epochs=2", "logger=none"]
    for attempt in (1, 2):
        out = tmp_path / f"ddp{attempt}"
        command = [sys.executable, str(ROOT / "scripts" / "train.py"), f"hydra.run.dir={out}"]
        result = subprocess.run(
            [*command, *overrides],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode == 0 or attempt == 2 or not gloo_crashed(result.stderr):
            break
        warnings.warn(
            f"a process died inside gloo, once more:\n{failure_lines(result.stderr)}",
            stacklevel=1,
        )
    assert result.returncode == 0, failure_lines(result.stderr)
    reported = json.loads((out / METRICS_FILE).read_text())
    cfg = compose_config([*overrides, f"paths.output_dir={tmp_path / 'single'}"])
    data = prepare(cfg)
    best = sorted((out / "checkpoints").glob("epoch*.ckpt"))[-1]
    module = TwoTowerModule.load_from_checkpoint(best, map_location="cpu", weights_only=False)
    single = evaluate_all(module, data, [10, 20, 50])
    for key in ("val/recall@20", "test/recall@20", "test/ndcg@50"):
        assert single[key] == pytest.approx(reported[key], abs=1e-9), key


@pytest.mark.slow
def test_multirun_sweep_returns_the_optimised_metric(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "-m",
            f"hydra.sweep.dir={tmp_path}",
            *TINY_OVERRIDES,
            "trainer.max_epochs=1",
            "logger=none",
            "model.temperature=0.05,0.2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, failure_lines(result.stderr)
    runs = sorted(tmp_path.glob("*/metrics.json"))
    assert len(runs) == 2


def test_refit_trains_on_all_of_train_for_the_chosen_epochs(tmp_path: Path) -> None:
    cfg = compose_config(
        [*TINY_OVERRIDES, "train.refit=true", "logger=none", f"paths.output_dir={tmp_path}"]
    )
    result = train(cfg)
    assert result is not None
    best_epoch = torch.load(result.best_checkpoint, weights_only=False)["epoch"]
    assert result.metrics["refit_epochs"] == best_epoch + 1
    assert result.data.info["trained_on"] == "train"
    validation_only = set(result.data.split.validation["item_id"]) - set(
        result.data.split.fit["item_id"]
    )
    known = set(result.data.encoders.items.ids.values)
    assert validation_only <= known  # the refit saw the validation events
    assert (tmp_path / "checkpoints" / "refit" / "last.ckpt").is_file()
    assert 0 < result.metrics["test/recall@20"] <= 1


def test_a_run_into_a_used_directory_replaces_its_checkpoints(tmp_path: Path) -> None:
    """Lightning would write last-v1.ckpt beside an earlier run's last.ckpt, and
    init_from=RUN (or the continuous benchmark's warm chain) would read the earlier one."""
    cfg = compose_config(
        [*TINY_OVERRIDES, "trainer.max_epochs=1", "logger=none", f"paths.output_dir={tmp_path}"]
    )
    data = prepare(cfg)
    train_for_epochs(cfg, data, 1, tmp_path / "refit")
    cfg.seed = int(cfg.seed) + 1
    second = train_for_epochs(cfg, data, 1, tmp_path / "refit")
    saved = torch.load(tmp_path / "refit" / "last.ckpt", weights_only=False)["state_dict"]
    assert saved.keys() == second.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in second.state_dict().items())
    assert [p.name for p in (tmp_path / "refit").iterdir()] == ["last.ckpt"]
    train(cfg)
    train(cfg)
    assert not list((tmp_path / "checkpoints").glob("*-v*.ckpt"))


def test_horizon_and_user_weighting_train_and_weight_as_asked(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            *TINY_OVERRIDES,
            "logger=none",
            "trainer.max_epochs=2",
            "train.target_horizon=5",
            "train.user_weight_power=1.0",
            f"paths.output_dir={tmp_path}",
        ]
    )
    result = train(cfg)
    assert result is not None and 0 < result.metrics["val/recall@20"] <= 1
    dataset = build_datamodule(cfg, result.data).dataset
    assert dataset.target_horizon == 5
    starts = result.data.sample_histories.starts
    per_user = {s: float(dataset.weights[starts == s].sum()) for s in set(starts.tolist())}
    assert max(per_user.values()) == pytest.approx(min(per_user.values()), rel=1e-4)
