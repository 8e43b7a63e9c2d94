"""scripts/train.py: a failing input exits non-zero with a message and leaves no bundle."""

from __future__ import annotations

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
