"""The scale ladder's two paths on a tiny rung: every stage done, in the job it belongs to,
with its peak RSS, and the report written (``twotower bench scale``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_scale import main


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "jobs"),
    [
        ("memory", {"all"}),
        ("prepared", {"prepare", "train"}),
    ],
)
def test_a_tiny_rung_runs_every_stage(tmp_path: Path, path: str, jobs: set[str]) -> None:
    out = tmp_path / "scale"
    main(
        [
            "--events",
            "20k",
            "--train-steps",
            "3",
            "--eval-users",
            "200",
            "--path",
            path,
            "--work-dir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.with_suffix(".json").read_text())
    assert all(row["status"] == "done" for row in rows), rows
    assert {row.get("job", "all") for row in rows} == jobs
    stages = [row["stage"] for row in rows]
    expected = ["generate", "read", "split", "encoders", "samples"]
    # the prepare job builds no evaluation sets (the training job builds them at load)
    expected += ["write", "load"] if path == "prepared" else ["eval_sets"]
    assert stages == [*expected, "train", "evaluate", "export"]
    assert all(row["peak_rss_gb"] > 0 for row in rows)
    by_stage = {row["stage"]: row for row in rows}
    assert by_stage["train"]["steps"] == 3
    if path == "prepared":  # the training job streamed the samples the prepare job wrote
        assert by_stage["load"]["samples"] == by_stage["samples"]["samples"]
        manifest = json.loads((tmp_path / "work" / "prepared-20000" / "prepared.json").read_text())
        # what the training job reads back: the item table with its attributes, the split
        assert manifest["settings"]["items"] and manifest["settings"]["users"]
        assert manifest["inputs"]["item"] != ["item_id"]
    report = out.with_suffix(".md").read_text()
    assert "20,000 events" in report and out.with_suffix(".png").is_file()
