"""Training throughput, Lightning vs a bare PyTorch loop, per optimiser set-up.

twotower bench training [--users 100000 --items 50000 --steps 200 ...]
Writes docs/benchmarks/training.json and training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from benchmarks.report import write_report
from benchmarks.training import OPTIMIZER_SETUPS, BenchSettings, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(BenchSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default)
    parser.add_argument(
        "--setups", default=",".join(OPTIMIZER_SETUPS), help="comma-separated optimiser set-ups"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating repeats; medians reported"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/training"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = BenchSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSettings)}
    )
    rows = run(settings, args.setups.split(","), args.rounds)
    write_report(
        args.out,
        "Training throughput: Lightning vs a bare PyTorch loop",
        "Examples/second over the same model, batches and optimiser, measured in one run "
        "(`twotower bench training`). `lightning_over_bare` is the ratio "
        "(target ≥ 0.9); `bare_vs_fastest` compares optimiser set-ups. Each number is the "
        "median of `rounds` alternating runs.",
        dataclasses.asdict(settings),
        rows,
        [
            "setup",
            "bare_examples_per_s",
            "lightning_examples_per_s",
            "lightning_over_bare",
            "bare_vs_fastest",
        ],
    )
    print((args.out.with_suffix(".md")).read_text())


