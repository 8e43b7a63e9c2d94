"""Training streamed from shards vs in memory: same metrics? what memory? (benchmarks/streaming.py)

twotower bench streaming [--events 1M] [--users 50000] [--items 10000] [--epochs 2]
    [--seeds 0,1]
Writes docs/benchmarks/streaming.json and streaming.md: per run (seed, samples in memory
or streamed from samples/ shards) the test and validation recall/NDCG@20, the seconds and
the peak RSS; per metric the largest gap between a streamed run and the in-memory run of
its seed, next to the gap between seeds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchmarks.bench_scale import parse_events
from benchmarks.report import write_report
from benchmarks.streaming import COMPARED, StreamingSettings, run

OUT = Path("docs/benchmarks/streaming")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = StreamingSettings()
    parser.add_argument("--events", default="1M", help="synthetic events, e.g. 1M")
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--items", type=int, default=defaults.items)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument("--group-shards", type=int, default=defaults.group_shards)
    parser.add_argument(
        "--prepare",
        choices=("local", "spark"),
        default=defaults.prepare_with,
        help="write the prepared directory with `twotower prepare` or `twotower spark prepare`",
    )
    parser.add_argument("--work-dir", default=defaults.work_dir)
    parser.add_argument(
        "--keep-data", action="store_true", help="reuse the work dir's prepared data"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="output stem (.json/.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = StreamingSettings(
        events=parse_events(args.events),
        users=args.users,
        items=args.items,
        epochs=args.epochs,
        seeds=tuple(int(seed) for seed in args.seeds.split(",")),
        samples_per_shard=args.samples_per_shard,
        group_shards=args.group_shards,
        work_dir=args.work_dir,
        keep_data=args.keep_data,
        prepare_with=args.prepare,
    )
    result = run(s)
    rows = [
        {
            "seed": r["seed"],
            "samples from": r["samples_from"],
            **{key: f"{r['metrics'][key]:.4f}" for key in COMPARED},
            "fit s": r["fit_seconds"],
            "run s": r["seconds"],
            "peak RSS GB": r["peak_rss_gb"],
        }
        for r in result["runs"]
    ]
    gaps = "\n".join(
        f"- {key}: streamed vs in memory (same seed) at most {gap['streamed_vs_memory']:.4f}; "
        f"between seeds (in memory) {gap['seed_to_seed']:.4f}"
        for key, gap in result["gaps"].items()
    )
    command = "twotower bench streaming " + " ".join(argv if argv is not None else sys.argv[1:])
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()) or "reused"
    job = "twotower spark prepare" if s.prepare_with == "spark" else "twotower prepare"
    write_report(
        args.out,
        "Training streamed from shards vs in memory",
        f"`twotower train data.prepared=DIR` on one `{job}` output, with the "
        "samples in memory and streamed from `samples/` (`data.stream=true`), each run in "
        "a fresh process (`benchmarks/streaming.py`). Produced by:\n\n"
        f"```\n{command}\n```\n\nData: {seconds}.",
        {k: v for k, v in s.__dict__.items() if k not in ("work_dir", "keep_data")},
        rows,
        list(rows[0]),
        notes=f"Gaps:\n\n{gaps}\n",
    )


if __name__ == "__main__":
    main()
