"""Where the main job's time goes: ``twotower train`` on the built-in synthetic data.

twotower bench main_job [--runs 3] [--out docs/benchmarks/main_job]
Runs the README's main job (default config) in a fresh process per run, from a
temporary directory, and splits its wall time into the stages the pipeline reports in
``metrics.json`` (``seconds``); the rest is start-up (imports, Hydra) and the sample
recommendation. Writes docs/benchmarks/main_job.json and main_job.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import write_report

log = logging.getLogger(__name__)
STAGES = ("load", "split", "features", "fit", "evaluate", "tensorboard", "export")
TARGET_SECONDS = 25.0


def one_run(workdir: Path) -> dict[str, Any]:
    """One main job in a fresh process; its wall time, stages and test metrics."""
    run_dir = workdir / "run"
    command = [
        sys.executable,
        "-m",
        "twotower",
        "train",
        f"hydra.run.dir={run_dir}",
        "export.latest=null",
        "trainer.enable_progress_bar=false",
    ]
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, env=environment, timeout=1800
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"the main job failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    seconds = metrics["seconds"]
    row: dict[str, Any] = {"wall_s": wall}
    row.update({f"{stage}_s": float(seconds.get(stage, 0.0)) for stage in STAGES})
    row["startup_and_sample_s"] = wall - sum(float(v) for v in seconds.values())
    row["test_recall@20"] = metrics["test/recall@20"]
    row["test_ndcg@20"] = metrics["test/ndcg@20"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/main_job"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as workdir:
            row = one_run(Path(workdir))
        row = {"run": run + 1, **row}
        log.info("%s", row)
        rows.append(row)
    walls = sorted(r["wall_s"] for r in rows)
    median = walls[len(walls) // 2]
    stage_means = {s: sum(r[f"{s}_s"] for r in rows) / len(rows) for s in STAGES}
    startup = sum(r["startup_and_sample_s"] for r in rows) / len(rows)
    biggest = sorted(stage_means.items(), key=lambda kv: -kv[1])[:3]
    write_report(
        args.out,
        "The main job: where its time goes",
        f"`twotower bench main_job --runs {args.runs}`: the README's main job "
        "(`twotower train`, default config, synthetic data: 3,000 users, 1,500 items, "
        "~90k events) in a fresh process per run on this machine. Stages from the run's "
        "`metrics.json` (`seconds`); `startup_and_sample_s` is the rest: importing torch, "
        "Lightning and Hydra, composing the config, and the sample recommendation.",
        {"runs": args.runs, "target_s": TARGET_SECONDS},
        rows,
        [
            "run",
            "wall_s",
            "startup_and_sample_s",
            *(f"{s}_s" for s in STAGES),
            "test_recall@20",
            "test_ndcg@20",
        ],
        f"Median wall time {median:.1f} s against the {TARGET_SECONDS:.0f} s target "
        + (
            "(met). "
            if median <= TARGET_SECONDS
            else f"(missed by {median - TARGET_SECONDS:.1f} s). "
        )
        + f"Start-up takes {startup:.1f} s; the largest stages are "
        + ", ".join(f"{s} {v:.1f} s" for s, v in biggest)
        + ".",
    )
    print(args.out.with_suffix(".md").read_text())
