"""Fault injection and a short soak against a real two-worker server: ``kill -9`` of a
worker and of the whole server, and a locked store, while clients write; no
acknowledged write may be lost (the full run is ``twotower bench reliability``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_reliability import bundle_root
from benchmarks.reliability import FAULTS, fault_rounds, soak
from towers.pipeline import TrainResult

pytestmark = [
    pytest.mark.slow,
    # a client thread that dies would write less and hide losses: make it a failure
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]


def test_no_acknowledged_write_is_lost_under_kill_9_and_a_locked_store(
    trained: TrainResult, tmp_path: Path
) -> None:
    root = bundle_root(trained.bundle, tmp_path / "bundles")
    rows = fault_rounds(root, tmp_path / "state", rounds=len(FAULTS), seed=1)
    assert [r["fault"] for r in rows] == list(FAULTS)
    for row in rows:
        assert row["acknowledged"] > 0, row
        assert row["events_lost"] == row["items_lost"] == row["workers_diverged"] == 0, row
        assert row["errors"] == 0, row  # refusals are 503s, dead connections no answer
    assert next(r for r in rows if r["fault"] == "lock_store")["refused_503"] > 0


def test_soak_reads_writes_and_reloads_together_without_errors(
    trained: TrainResult, tmp_path: Path
) -> None:
    root = bundle_root(trained.bundle, tmp_path / "bundles")
    result = soak(root, tmp_path / "state", seconds=20)
    assert result["reads"] > 0 and result["writes"] > 0 and result["reloads"] >= 5
    assert result["read_errors"] == result["write_errors"] == result["reload_errors"] == 0
    assert result["events_lost"] == result["items_lost"] == result["workers_diverged"] == 0
    # RSS bounded: the second half's peak no more than 15% above the first half's
    assert result["rss_max_second_half_mb"] <= 1.15 * result["rss_max_first_half_mb"], result
