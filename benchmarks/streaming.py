"""Training streamed from shards against training on the same samples in memory.

One synthetic dataset (:func:`towers.data.synthetic_shards.write_synthetic_shards`) is
prepared once, with ``twotower prepare`` (or ``twotower spark prepare`` in Spark's local
mode: ``prepare_with="spark"``); then ``twotower
train data.prepared=DIR`` runs on it for a fixed number of epochs with the samples in
memory and with ``data.stream=true``, for each of a few seeds, every run in a fresh
process so that its peak RSS is its own. The spread between seeds of the in-memory runs
is the noise that the streamed runs' metrics are judged against.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPARED = ("val/recall@20", "val/ndcg@20", "test/recall@20", "test/ndcg@20")


@dataclass
class StreamingSettings:
    """What ``twotower bench streaming`` runs (see the module doc)."""

    events: int = 1_000_000
    users: int = 50_000
    items: int = 10_000
    epochs: int = 2
    seeds: tuple[int, ...] = (0, 1)
    samples_per_shard: int = 250_000
    group_shards: int = 2
    batch_size: int = 1024
    work_dir: str = "/tmp/twotower-streaming"
    keep_data: bool = False  # reuse the work directory's prepared data, when complete
    prepare_with: str = "local"  # twotower prepare, or "spark": twotower spark prepare


def prepare(s: StreamingSettings) -> tuple[Path, Path, dict[str, float]]:
    """The synthetic tables and their prepared directory; the seconds of each step."""
    from towers.data.synthetic_shards import (
        INTERACTIONS_DIR,
        ITEMS_FILE,
        USERS_FILE,
        ShardedSyntheticSettings,
        write_synthetic_shards,
    )

    if s.prepare_with not in ("local", "spark"):
        raise ValueError(f"prepare_with must be local or spark, got {s.prepare_with!r}")
    work = Path(s.work_dir)
    data_dir, prepared = work / "data", work / "prepared"
    seconds: dict[str, float] = {}
    if s.keep_data and (prepared / "prepared.json").is_file():
        log.info("reusing %s", prepared)
        return data_dir / USERS_FILE, prepared, seconds
    start = time.perf_counter()
    write_synthetic_shards(
        data_dir,
        ShardedSyntheticSettings(
            n_users=s.users, n_items=s.items, mean_events_per_user=s.events / s.users
        ),
    )
    seconds["generate"] = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from twotower.cli import main; sys.exit(main(sys.argv[1:]))",
            *(["spark"] if s.prepare_with == "spark" else []),
            "prepare",
            "--interactions",
            str(data_dir / INTERACTIONS_DIR),
            "--items",
            str(data_dir / ITEMS_FILE),
            "--users",
            str(data_dir / USERS_FILE),
            "--output",
            str(prepared),
            "--samples-per-shard",
            str(s.samples_per_shard),
            "--overwrite",
        ],
        check=True,
    )
    seconds[f"{s.prepare_with}_prepare"] = time.perf_counter() - start
    return data_dir / USERS_FILE, prepared, seconds


def run_name(seed: int, stream: bool) -> str:
    """The run directory's name under ``runs/``."""
    return f"{'streamed' if stream else 'in_memory'}-seed{seed}"


def run_overrides(
    s: StreamingSettings, users: Path, prepared: Path, seed: int, stream: bool
) -> list[str]:
    """``twotower train`` overrides of one run."""
    run_dir = Path(s.work_dir) / "runs" / run_name(seed, stream)
    return [
        "data=csv",
        f"data.prepared={prepared}",
        f"data.users={users}",
        f"data.stream={str(stream).lower()}",
        f"data.stream_group_shards={s.group_shards}",
        f"seed={seed}",
        f"train.batch_size={s.batch_size}",
        f"trainer.max_epochs={s.epochs}",
        "trainer.enable_progress_bar=false",
        "logger=none",
        f"paths.output_dir={run_dir}",
        f"export.bundle_dir={run_dir / 'bundle'}",
        "export.latest=null",
    ]


def child(overrides: list[str], out: Path) -> None:
    """One training run in this process: its metrics, seconds and peak RSS into ``out``."""
    from hydra import compose, initialize_config_dir

    from towers.pipeline import train
    from twotower.config import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    start = time.perf_counter()
    result = train(cfg)
    assert result is not None
    seconds = json.loads((result.output_dir / "metrics.json").read_text())["seconds"]
    out.write_text(
        json.dumps(
            {
                "metrics": {k: result.metrics[k] for k in COMPARED},
                "seconds": round(time.perf_counter() - start, 1),
                "fit_seconds": round(seconds.get("fit", 0.0), 1),
                "samples": result.data.n_samples,
                "peak_rss_gb": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3
                ),
            }
        )
    )


def run(s: StreamingSettings) -> dict[str, Any]:
    """Prepare once, then every (seed, in memory | streamed) run in its own process."""
    users, prepared, seconds = prepare(s)
    rows = []
    for seed in s.seeds:
        for stream in (False, True):
            out = Path(s.work_dir) / f"run-{seed}-{stream}.json"
            overrides = run_overrides(s, users, prepared, seed, stream)
            shutil.rmtree(Path(s.work_dir) / "runs" / run_name(seed, stream), ignore_errors=True)
            subprocess.run(
                [sys.executable, "-m", "benchmarks.streaming", str(out), *overrides], check=True
            )
            row = {"seed": seed, "samples_from": "shards" if stream else "memory"}
            row.update(json.loads(out.read_text()))
            log.info("%s", row)
            rows.append(row)
    return {"settings": s.__dict__, "seconds": seconds, "runs": rows, **compare(rows)}


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: the largest gap between a streamed run and the in-memory run of its
    seed, and the largest gap between two seeds' in-memory runs (the noise)."""
    memory = {r["seed"]: r["metrics"] for r in rows if r["samples_from"] == "memory"}
    streamed = {r["seed"]: r["metrics"] for r in rows if r["samples_from"] == "shards"}
    gaps: dict[str, dict[str, float]] = {}
    for key in COMPARED:
        to_memory = max(abs(streamed[seed][key] - memory[seed][key]) for seed in streamed)
        values = [m[key] for m in memory.values()]
        gaps[key] = {
            "streamed_vs_memory": round(to_memory, 5),
            "seed_to_seed": round(max(values) - min(values), 5),
        }
    return {"gaps": gaps}


if __name__ == "__main__":  # the child: python -m benchmarks.streaming OUT OVERRIDES...
    logging.basicConfig(level=logging.WARNING)
    child(sys.argv[2:], Path(sys.argv[1]))
