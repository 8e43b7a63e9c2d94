"""Continuous retraining: warm-start updates (``init_from``) against full retrains.

twotower bench continuous [--datasets ml-100k,ml-latest-small] [--steps 3 --warm-epochs 2]
                          [--warm-validation newer] [--warm-shrink 0.5 --warm-perturb 0.1]
                          [--warm-override model.optimizer.lr=0.0003 ...]
                          [--warm-lr-scale 0.3] [--seeds 3] [--reuse-full]
                          [--unknown-users model] [--warm-from first]
Replays each MovieLens dataset in time: a first model on the first 80% of the events, then
steps of 5%; at each step a warm update of the previous model and a full retrain from
scratch, both scored on the next slice (with --seeds N, N replays from N seeds, each
model's per-user NDCG@20 averaged over them). --reuse-full loads the full retrains of an
earlier replay into the same --workdir that had the same config, seed, data, thread count
and training code, instead of training them again. Users of a slice known by nothing get
the most popular items, as a served bundle answers them, and stay out of the gaps
(--unknown-users model: each model's own ranking, gaps included). Writes
docs/benchmarks/continuous.json and continuous.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from benchmarks.continuous import (
    UNKNOWN_USERS,
    WARM_FROM,
    ContinuousSettings,
    replay,
    summary,
)
from benchmarks.report import write_report

OPTION_HELP: dict[str, dict[str, Any]] = {
    "warm_from": {
        "choices": WARM_FROM,
        "help": "where each warm update starts: 'previous', the previous step's warm model "
        "(a chain of updates); 'first', the first model, a full retrain (as with a full "
        "retrain every few updates, each update starting from the latest full one)",
    },
    "unknown_users": {
        "choices": UNKNOWN_USERS,
        "help": "users of a slice known by nothing (no event up to the cut, not in the "
        "user table): 'popularity' scores them with the most popular items, as a "
        "served bundle answers them, and leaves them out of the gaps; 'model' scores them "
        "with each model's own ranking, gaps included (the reports before this option)",
    },
}
ROOT = Path(__file__).resolve().parents[1]  # the checkout: benchmarks live outside the wheel
DATASETS = {
    "ml-100k": "experiment=movielens_100k",
    "ml-latest-small": "experiment=movielens_latest",
}
COLUMNS = [
    "dataset",
    "step",
    "cut",
    "train_events",
    "next_users",
    "returning_users",
    "model_users",
    "full_ndcg@20",
    "warm_ndcg@20",
    "warm_minus_full_ndcg@20",
    "warm_minus_full_95%",
    "full_b_minus_full_ndcg@20",
    "full_b_minus_full_95%",
    "stale_ndcg@20",
    "popularity_ndcg@20",
    "full_recall@20",
    "warm_recall@20",
    "full_epochs",
    "warm_epochs",
    "full_s",
    "warm_s",
    "warm_over_full",
]


def columns(settings: ContinuousSettings) -> list[str]:
    """The table's columns: with several seeds, each seed's gap and their t-interval too."""
    if settings.seeds == 1:
        return COLUMNS
    at = COLUMNS.index("warm_minus_full_95%") + 1
    return [*COLUMNS[:at], "warm_minus_full_seeds", "warm_minus_full_seed_95%", *COLUMNS[at:]]


def interval_cell(row: dict[str, Any], model: str) -> str:
    """``[low, high]`` of a gap's 95% interval, for the table ('' where not measured)."""
    low, high = row.get(f"{model}_minus_full_low"), row.get(f"{model}_minus_full_high")
    return "" if low is None or high is None else f"[{low:+.3f}, {high:+.3f}]"


def verdict(name: str, total: dict[str, Any], settings: ContinuousSettings) -> str:
    """One dataset's summary, in words."""
    met = "met" if total["target_met"] else "missed"
    text = (
        f"**{name}**: warm - full NDCG@20 {total['mean_gap']:+.4f} on average, "
        f"{total['worst_gap']:+.4f} at worst over {total['steps']} updates (target: every "
        f"update within {settings.target_ndcg_gap}; {met})"
    )
    if "pooled_gap" in total:
        gap, low, high = total["pooled_gap"]
        above = "above" if total["pooled_above_target"] else "not above"
        users = (
            "the users the models serve in all the updates"
            if settings.unknown_users == "popularity"
            else "all the updates' users"
        )
        text += (
            f"; over {users} {gap:+.4f}, 95% interval [{low:+.4f}, "
            f"{high:+.4f}] ({above} -{settings.target_ndcg_gap})"
        )
    if "full_b_pooled_gap" in total:
        gap, low, high = total["full_b_pooled_gap"]
        text += (
            f". A second full retrain (seed + {settings.seeds}) is "
            f"{total['full_b_mean_abs_gap']:.4f} from "
            f"the first on average and {total['full_b_worst_abs_gap']:.4f} at worst "
            f"(pooled {gap:+.4f}, [{low:+.4f}, {high:+.4f}])"
        )
    return text + (
        f". The warm updates took {total['warm_s']:.0f} s against the full retrains' "
        f"{total['full_s']:.0f} s ({total['mean_warm_over_full']:.2f}x on average per step)."
    )


def warm_protocol(settings: ContinuousSettings) -> str:
    """How the warm updates train, in words."""
    data = "all data up to the cut" + (
        f" of the last {settings.window_days:g} days" if settings.window_days else ""
    )
    start = "`init_from`"
    if (settings.warm_shrink, settings.warm_perturb) != (1.0, 0.0):
        start += (
            f" with its weights shrunk and perturbed ({settings.warm_shrink:g} x previous + "
            f"{settings.warm_perturb:g} x fresh initialisation)"
        )
    if settings.warm_lr_scale != 1.0:
        data += f", at {settings.warm_lr_scale:g} x the learning rate"
    if settings.warm_overrides:
        data += f", with {', '.join(f'`{o}`' for o in settings.warm_overrides)}"
    if settings.warm_validation == "newer":
        return (
            "epoch count by early stopping on a validation held out of the events after the "
            "cut of the model it starts from, which that model has not seen (per user, the last "
            f"share of their newer events), then refit from {start} on {data}"
        )
    return f"from {start}, {settings.warm_epochs} epoch(s) on {data}, no selection"


def start_model(settings: ContinuousSettings) -> str:
    """The model a warm update starts from, in words."""
    if settings.warm_from == "first":
        return "the first model (a full retrain: every update starts from it, not from the last)"
    return "the previous step's warm model"


def unknown_users_text(settings: ContinuousSettings) -> str:
    """How the users known by nothing are scored, in words."""
    if settings.unknown_users == "model":
        return (
            "Every user of the slice is scored with the model's own ranking, also users "
            "known by nothing at the cut (no event before it, not in the user table), whom "
            "a served bundle would answer with the most popular items. "
        )
    return (
        "Users of the slice known by nothing at the cut (no event before it, not in the "
        "user table) are scored with the most popular items, as a served bundle "
        "answers them whichever model it holds (`unknown_ndcg@20` in the JSON is the "
        "model's own ranking for them); `model_users` are the others, whom the models "
        "serve. "
    )


def seeds_text(settings: ContinuousSettings) -> str:
    """How the seeds enter the report, in words ('' for one seed)."""
    if settings.seeds == 1:
        return ""
    return (
        f"Every model is trained from {settings.seeds} seeds (the config's seed and the "
        f"next {settings.seeds - 1}), each seed with its own warm chain; metrics are means "
        "over the seeds, and gaps are taken between per-user NDCG@20 averaged over the "
        "seeds, which shrinks the training's randomness (the models are scored one by one, "
        "not as an ensemble). `warm_minus_full_seeds` lists each seed's own gap, and "
        f"`warm_minus_full_seed_95%` is the t-interval of their mean ({settings.seeds - 1} "
        "degrees of freedom), which covers the training's randomness and not the users'. "
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument(
        "--datasets-dir",
        default=os.environ.get("TWOTOWER_DATASETS", str(ROOT.parent / "shared" / "datasets")),
    )
    for field in dataclasses.fields(ContinuousSettings):
        if field.name == "warm_overrides":
            continue
        kind = {"int": int, "str": str}.get(str(field.type), float)
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=kind,
            default=field.default,
            **OPTION_HELP.get(field.name, {}),
        )
    parser.add_argument(
        "--warm-override",
        dest="warm_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override of the warm updates only (repeatable), e.g. "
        "model.optimizer.lr=0.0003; positional overrides apply to every model",
    )
    parser.add_argument(
        "--reuse-full",
        action="store_true",
        help="load the full retrains an earlier replay wrote into --workdir with the same "
        "config, seed, data, thread count and training code (every towers module) instead "
        "of training them again",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a small machine shared with other jobs, two threads "
        "contend and run several times slower)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench_continuous"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "continuous")
    parser.add_argument("overrides", nargs="*", help="twotower config overrides, key=value")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    settings = ContinuousSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ContinuousSettings)}
    )
    rows = []
    pooled: dict[str, dict[str, tuple[float, float, float]]] = {}
    for name in args.datasets.split(","):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    DATASETS[name],
                    f"data.path={Path(args.datasets_dir) / name}",
                    f"model.ensemble={settings.ensemble}",
                    "logger=none",
                    "trainer.enable_progress_bar=false",
                    "export.latest=null",
                    f"paths.output_dir={args.workdir / name}",
                    *args.overrides,
                ],
            )
        dataset_rows, pooled[name] = replay(
            name, cfg, settings, args.workdir / name, reuse_full=args.reuse_full
        )
        rows += dataset_rows
    totals = summary(rows, settings, pooled)
    for row in rows:
        for model in ("warm", "full_b"):
            row[f"{model}_minus_full_95%"] = interval_cell(row, model)
        if "warm_minus_full_by_seed" in row:
            row["warm_minus_full_seeds"] = ", ".join(
                f"{gap:+.3f}" for gap in row["warm_minus_full_by_seed"]
            )
            low, high = row["warm_minus_full_seed_low"], row["warm_minus_full_seed_high"]
            row["warm_minus_full_seed_95%"] = f"[{low:+.3f}, {high:+.3f}]"
    command = (
        "twotower bench continuous"
        + (f" --threads {args.threads}" if args.threads != 1 else "")
        + "".join(
            f" --{f.name.replace('_', '-')} {getattr(settings, f.name)}"
            for f in dataclasses.fields(ContinuousSettings)
            if f.name != "warm_overrides" and getattr(settings, f.name) != f.default
        )
        + "".join(f" --warm-override {override}" for override in settings.warm_overrides)
        + (f" --reuse-full --workdir {args.workdir}" if args.reuse_full else "")
    )
    if args.datasets != ",".join(DATASETS):
        command += f" --datasets {args.datasets}"
    command += "".join(f" {override}" for override in args.overrides)
    verdicts = [verdict(name, total, settings) for name, total in totals.items()]
    write_report(
        args.out,
        "Continuous retraining: warm-start updates vs full retrains",
        "Each MovieLens dataset replayed in time (`benchmarks/continuous.py`): the first "
        f"model is trained on the first {settings.start:.0%} of the events in time order, "
        f"then each step adds the next {settings.step:.0%}. At each step a **warm** update "
        f"of {start_model(settings)} ({warm_protocol(settings)}) and a "
        "**full** retrain from scratch (epoch count by early "
        "stopping on validation, then refit on all data up to the cut, as the presets do) "
        "are scored on the **next** slice: its users, every item a candidate, each user's "
        f"earlier items excluded (EVALUATION.md metrics). `stale` is {start_model(settings)} "
        "without the update; `popularity` counts the events up to the cut; `full_b` "
        + (
            "is a second full retrain from seed + 1, how far two full retrains are apart on "
            "the same slice. "
            if settings.seeds == 1
            else f"is a second set of {settings.seeds} full retrains, from the next "
            f"{settings.seeds} seeds, how far two such sets are apart on the same slice. "
        )
        + unknown_users_text(settings)
        + "Gaps are per-user NDCG@20 differences averaged over "
        + (
            "the slice's users the models serve (`model_users`), "
            if settings.unknown_users == "popularity"
            else "the slice's users, "
        )
        + f"with a 95% interval (BCa bootstrap over the users, {settings.resamples} draws: it "
        "covers which users are in the slice, not the training's randomness, which `full_b` "
        "shows). "
        + seeds_text(settings)
        + "Step 0 is the first model (full only). All models use the dataset's preset with "
        f"`model.ensemble={settings.ensemble}`; times are wall seconds on this machine "
        "(shared with other jobs, so noisy), per model (the mean over the seeds)"
        + (
            "; a reused full retrain's seconds are those it took when it was trained"
            if args.reuse_full
            else ", measured in one run"
        )
        + f". Command: `{command}`.",
        {**dataclasses.asdict(settings), "threads": args.threads},
        rows,
        columns(settings),
        "\n\n".join(verdicts),
    )
    report = args.out.with_suffix(".json")
    payload = json.loads(report.read_text())
    payload["summary"] = totals
    payload["command"] = command
    report.write_text(json.dumps(payload, indent=2, default=str))
    print(args.out.with_suffix(".md").read_text())
