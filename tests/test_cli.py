"""The twotower command (and scripts/train.py, its thin wrapper): a failing input exits
non-zero with a message and leaves no bundle; --help is fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from .conftest import ROOT, TINY_OVERRIDES


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            f"hydra.run.dir={tmp_path}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )


def test_missing_movielens_folder_fails_cleanly(tmp_path: Path) -> None:
    result = run_train(tmp_path, "data=movielens_100k", f"data.path={tmp_path / 'nowhere'}")
    assert result.returncode != 0
    assert "u.data: no such file" in result.stderr
    assert not (tmp_path / "bundle").exists()


def test_csv_with_a_missing_column_names_it(tmp_path: Path) -> None:
    events = tmp_path / "events.csv"
    pd.DataFrame({"user_id": ["a"], "timestamp": [1]}).to_csv(events, index=False)
    result = run_train(tmp_path, "data=csv", f"data.interactions={events}")
    assert result.returncode != 0
    assert "events.csv: interactions table has no column 'item_id'" in result.stderr
    assert not (tmp_path / "bundle").exists()


@pytest.mark.slow
def test_main_job_prints_metrics_and_a_recommendation(tmp_path: Path) -> None:
    result = run_train(tmp_path, *TINY_OVERRIDES)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| test twotower |" in result.stdout and "| test popularity |" in result.stdout
    assert "sample recommendation for user" in result.stdout
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    assert (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_a_redirected_run_logs_its_config_and_one_line_per_epoch(tmp_path: Path) -> None:
    result = run_train(tmp_path, *TINY_OVERRIDES, "trainer.max_epochs=3")
    assert result.returncode == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr  # Hydra logs to stdout
    assert "config:" in log and "optimized_metric: val/recall@20" in log
    epochs = [line for line in log.splitlines() if "towers.model.module" in line]
    assert len(epochs) == 3 and all("val/recall@20" in line and " s" in line for line in epochs)
    assert "epoch 3/3: loss" in epochs[-1]
    assert "Tip:" not in log and "LeafSpec" not in log
    seconds = json.loads((tmp_path / "metrics.json").read_text())["seconds"]
    assert {"load", "split", "features", "fit", "evaluate", "export"} <= set(seconds)


@pytest.mark.parametrize(
    "command", [["--help"], ["train", "--help"], ["export", "--help"], ["serve", "--help"]]
)
def test_help_imports_nothing_heavy(command: list[str]) -> None:
    """``--help`` answers before torch (or, for serve, Hydra) is imported."""
    probe = (
        "import sys; from twotower.cli import main; main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'pytorch_lightning', 'onnx') if m in sys.modules]; "
        "assert not heavy, heavy; print('hydra' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *command], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower() or "powered by hydra" in result.stdout.lower()
    if command[0] == "serve":
        assert result.stdout.strip().endswith("False")  # no Hydra either


def test_unknown_command_and_bad_serve_setting_exit_non_zero() -> None:
    from twotower.cli import main

    assert main(["fly"]) == 2
    assert main(["serve", "port=abc"]) == 2
    assert main(["serve", "colour=blue"]) == 2
    assert main(["bench", "nothing"]) == 2


def test_serve_refuses_a_bad_bundle_before_starting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "twotower", "serve", f"bundle={tmp_path / 'absent'}", "auth=none"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "no such bundle directory" in result.stderr


def test_relative_data_paths_resolve_against_the_run_start(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from towers.config import absolute_paths, run_directory_of

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        {"hydra": {"runtime": {"cwd": str(tmp_path / "start")}}}, run / ".hydra" / "hydra.yaml"
    )
    cfg = OmegaConf.create(
        {
            "data": {"interactions": "events.csv", "items": None, "path": "s3://bucket/x"},
            "export": {"latest": "outputs/latest"},
        }
    )
    absolute_paths(cfg, run_directory_of(run))
    assert cfg.data.interactions == str(tmp_path / "start" / "events.csv")
    assert cfg.data["items"] is None and cfg.data.path == "s3://bucket/x"
    assert cfg.export.latest == str(tmp_path / "start" / "outputs" / "latest")


def test_spark_without_pyspark_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from twotower.cli import spark

    for name in [m for m in sys.modules if m == "pyspark" or m.startswith("pyspark.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark raises ImportError
    code = spark.run(
        [
            "prepare",
            "--interactions",
            str(tmp_path / "e.parquet"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1
    assert "pip install 'twotower[spark]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
