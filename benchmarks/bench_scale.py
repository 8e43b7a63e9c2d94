"""The scale ladder: where one machine stops (see benchmarks/scale.py).

twotower bench scale [--events 1M,10M,100M] [--train-steps 100] [--rss-limit-gb 20]
    [--path memory|prepared]
Writes docs/benchmarks/scale.json (a list of rows: events, stage, seconds, peak_rss_gb,
...), scale.md (the table and where each rung stopped) and scale.png; scale_prepared.*
for --path prepared. Rows of rungs not run this time are kept from the previous file, so
rungs can be run one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.report import machine, markdown_table
from benchmarks.scale import LADDER, Rung, ScaleSettings, run_path, run_stages, summary

OUT = Path("docs/benchmarks/scale")
OUTS = {"memory": OUT, "prepared": Path("docs/benchmarks/scale_prepared")}
COLUMNS = ["events", "stage", "status", "seconds", "events_per_second", "peak_rss_gb", "detail"]
DETAILS = {
    "samples": "training samples",
    "steps": "optimiser steps",
    "examples_per_second": "examples/s",
    "epoch_seconds_extrapolated": "s per epoch (extrapolated)",
    "users": "users scored",
    "recall_at_20": "test recall@20",
    "all_users_seconds_extrapolated": "s for all test users (extrapolated)",
    "index": "index",
    "shards": "sample shards",
}


def detail(row: dict[str, Any]) -> str:
    """The stage-specific figures of a row, in words."""
    return "; ".join(
        f"{row[key]:,} {words}" if isinstance(row[key], int) else f"{words} {row[key]}"
        for key, words in DETAILS.items()
        if key in row
    )


STAGES = [
    "generate",
    "read",
    "split",
    "encoders",
    "samples",
    "eval_sets",
    "write",
    "load",
    "train",
    "evaluate",
    "export",
]


def parse_events(text: str) -> int:
    """``1M`` -> 1_000_000; ``250k`` -> 250_000; plain integers as they are."""
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def rungs_for(events: list[int]) -> tuple[Rung, ...]:
    """The ladder's rung for each size; other sizes keep 20 events per user, 1 item per 100
    events."""
    known = {rung.events: rung for rung in LADDER}
    return tuple(known.get(n, Rung(n, max(1, n // 20), max(100, n // 100))) for n in events)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Seconds and peak RSS of each stage against events (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        done = [r for r in rows if r["stage"] == stage and r["status"] == "done"]
        if done:
            x = [r["events"] for r in done]
            left.plot(x, [max(r["seconds"], 0.01) for r in done], marker="o", label=stage)
            right.plot(x, [r["peak_rss_gb"] for r in done], marker="o", label=stage)
    for axis, label in ((left, "seconds"), (right, "peak RSS (GB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("events")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    right.axhline(8, color="grey", linestyle="--", linewidth=1)
    left.legend(fontsize=7, ncol=2)
    figure.suptitle("twotower scale ladder (one machine, synthetic data)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write(rows: list[dict[str, Any]], s: ScaleSettings, out: Path) -> None:
    """scale.json (the rows), scale.md and scale.png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    runs = summary(rows)
    commands = "\n".join(dict.fromkeys(str(row.get("command", "")) for row in rows))
    stops = "\n".join(
        f"- {int(events):,} events: {info['seconds']:,} s in all, peak RSS "
        f"{info['peak_rss_gb']} GB"
        + (
            " ("
            + ", ".join(f"{job} job {gb} GB" for job, gb in info["peak_rss_gb_by_job"].items())
            + ")"
            if s.path != "memory"
            else ""
        )
        + (f"; **{info['reason']} in `{info['stopped_at']}`**" if info["stopped_at"] else "")
        for events, info in runs.items()
    )
    columns = COLUMNS if s.path == "memory" else ["events", "job", *COLUMNS[1:]]
    how = (
        "The main job's stages, one by one, on synthetic data of growing size "
        "(`benchmarks/scale.py`), each rung in a fresh process."
        if s.path == "memory"
        else "The main job's stages on synthetic data of growing size (`benchmarks/scale.py`), "
        "each rung as two jobs in two fresh processes: `prepare` (the data stages, then "
        "`write`: the prepared directory, as `twotower prepare` writes it) and `train` "
        "(`load`: that directory, its samples left in their shards, as `data.prepared=DIR "
        "data.stream=true` loads it; then training with the samples streamed, evaluation, "
        "export)."
    )
    settings = {
        k: v
        for k, v in asdict(s).items()
        if k not in ("rungs", "work_dir", "job", "jobs") and (v or k != "overrides")
    }  # jobs: each command (above) says which it ran
    title = "Scale ladder" if s.path == "memory" else "Scale ladder: prepare, then train"
    body = (
        f"# {title}\n\n"
        f"{how} Produced by (rungs can be run one at a time; the other rungs' rows are "
        "kept):\n\n"
        f"```\n{commands}\n```\n\n"
        f"Settings: {', '.join(f'{k}={v}' for k, v in settings.items())}. "
        f"Machine: {machine()['processor']}, {machine()['torch_threads']} torch threads.\n\n"
        f"{stops}\n\n![seconds and peak RSS per stage]({out.with_suffix('.png').name})\n\n"
        f"{markdown_table([{**row, 'detail': detail(row)} for row in rows], columns)}\n"
    )
    out.with_suffix(".md").write_text(body)
    plot(rows, out.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", default="1M,10M,100M", help="rung sizes, e.g. 1M,10M")
    parser.add_argument("--train-steps", type=int, default=ScaleSettings.train_steps)
    parser.add_argument("--batch-size", type=int, default=ScaleSettings.batch_size)
    parser.add_argument("--eval-users", type=int, default=ScaleSettings.eval_users)
    parser.add_argument("--rss-limit-gb", type=float, default=ScaleSettings.rss_limit_gb)
    parser.add_argument("--work-dir", default=ScaleSettings.work_dir)
    parser.add_argument(
        "--path",
        choices=("memory", "prepared"),
        default="memory",
        help="memory: the main job in one process; prepared: twotower prepare, then "
        "training from its directory with the samples streamed, in two processes",
    )
    parser.add_argument(
        "--jobs",
        default="prepare,train",
        help="with --path prepared: train alone reuses the directory of an earlier prepare",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override of the main job's config, repeatable "
        "(e.g. +model.optimizer.sparse_rule=adam)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output stem (.json/.md/.png)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.child:
        values = json.loads(args.child.read_text())
        rung = Rung(**values.pop("rungs")[0])
        run_stages(rung, ScaleSettings(**values), args.child.with_suffix("").with_suffix(".jsonl"))
        return
    s = ScaleSettings(
        rungs=rungs_for([parse_events(e) for e in args.events.split(",")]),
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        eval_users=args.eval_users,
        rss_limit_gb=args.rss_limit_gb,
        work_dir=args.work_dir,
        path=args.path,
        overrides=tuple(args.override),
        jobs=tuple(job.strip() for job in args.jobs.split(",") if job.strip()),
    )
    out = args.out or OUTS[s.path]
    Path(s.work_dir).mkdir(parents=True, exist_ok=True)
    previous = out.with_suffix(".json")
    rows = json.loads(previous.read_text()) if previous.is_file() else []
    for rung in s.rungs:
        new = run_path(rung, s)
        command = "twotower bench scale " + " ".join(argv if argv is not None else sys.argv[1:])
        for row in new:
            row["command"] = command
        ran = {"all"} if s.path == "memory" else set(s.jobs)  # other jobs' rows are kept
        rows = [r for r in rows if r["events"] != rung.events or r.get("job", "all") not in ran]
        rows += new
        rows.sort(key=lambda r: (r["events"], STAGES.index(r["stage"])))  # prepare first
        write(rows, s, out)


if __name__ == "__main__":
    main()
