"""Summaries of one benchmark repeated over several splits (mean, spread, every split)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import mean, stdev
from typing import Any


def split_summary(
    runs: Mapping[int, Sequence[Mapping[str, Any]]], metrics: Sequence[str]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Table columns and one row per model: for each metric its mean, standard deviation
    (0 for a single split) and the value on every split, keyed by split seed.

    ``runs`` maps a split seed to that split's benchmark rows (dicts with ``model`` and the
    metrics); a model missing from some split is summarised over the splits it has.
    """
    if not runs:
        raise ValueError("no split was run")
    seeds = list(runs)
    models = list(dict.fromkeys(row["model"] for rows in runs.values() for row in rows))
    columns = ["model", "splits"]
    for metric in metrics:
        columns += [f"{metric} mean", f"{metric} sd", *(f"{metric} s{seed}" for seed in seeds)]
    table = []
    for model in models:
        by_seed = {seed: row for seed in seeds for row in runs[seed] if row["model"] == model}
        entry: dict[str, Any] = {"model": model, "splits": len(by_seed)}
        for metric in metrics:
            values = [float(row[metric]) for row in by_seed.values()]
            entry[f"{metric} mean"] = mean(values)
            entry[f"{metric} sd"] = stdev(values) if len(values) > 1 else 0.0
            for seed, row in by_seed.items():
                entry[f"{metric} s{seed}"] = float(row[metric])
        table.append(entry)
    return columns, table
