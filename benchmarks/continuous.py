"""Continuous retraining: warm-start updates against full retrains, replayed over time.

The interactions are cut in time: the first ``start`` share of the events (in time order)
trains the first model, then each step adds the next ``step`` share. At each step two
models are trained on everything up to the cut:

- **warm**: the previous step's warm model (the first model at the first step) updated
  with ``init_from`` for a fixed ``warm_epochs`` epochs (optionally on the last
  ``window_days`` days only), with no model selection: :func:`towers.pipeline.train_for_epochs`;
- **full**: a model trained from scratch as the pipeline does: epoch count chosen by early
  stopping on a validation split of the data up to the cut, then refitted on all of it
  (``train.refit``, as the MovieLens presets do).

Both are scored on the **next** slice, as EVALUATION.md ranks: the users with events in
it, every catalogue item a candidate, each user's earlier items excluded, their history
the events up to the cut; Recall@K and NDCG@K. The model of the step before, not updated
(``stale``), and popularity (counts up to the cut) are scored beside them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from towers.data.eval_sets import build_eval_set
from towers.data.prepare import PreparedData, prepare_data
from towers.data.schema import TIMESTAMP, USER_ID, RawData
from towers.data.sources import load_data
from towers.data.split import Split, prepare_interactions, recent_window, temporal_holdout
from towers.evaluation.callback import evaluate_module
from towers.evaluation.ranking import evaluate_popularity
from towers.model.module import TwoTowerModule
from towers.pipeline import feature_settings, fit_and_select, train_for_epochs

log = logging.getLogger(__name__)
KS = (10, 20, 50)


@dataclass
class ContinuousSettings:
    """One replay: where the first model's data ends, the step, how warm updates train."""

    start: float = 0.8
    step: float = 0.05
    steps: int = 3
    warm_epochs: int = 2
    window_days: float | None = None
    # tower pairs of both models (the MovieLens presets train 3 or 7; 1 keeps the replay
    # within minutes on two CPU cores)
    ensemble: int = 1
    target_ndcg_gap: float = 0.01


@dataclass
class Slices:
    """The deduplicated events in time order and the cut points (timestamps)."""

    events: pd.DataFrame
    cuts: list[float]

    def known(self, step: int) -> pd.DataFrame:
        return self.events.loc[self.events[TIMESTAMP] <= self.cuts[step]]

    def next(self, step: int) -> pd.DataFrame:
        times = self.events[TIMESTAMP]
        return self.events.loc[(times > self.cuts[step]) & (times <= self.cuts[step + 1])]


def make_slices(raw: RawData, cfg: DictConfig, settings: ContinuousSettings) -> Slices:
    """Cut points at the ``start``, ``start + step``, ... quantiles of the event times (so
    each slice holds about ``step`` of the events), and the newest event last."""
    events = prepare_interactions(raw.interactions, cfg.data.get("min_rating"))
    times = events[TIMESTAMP].to_numpy()
    shares = [settings.start + k * settings.step for k in range(settings.steps + 1)]
    if shares[-1] >= 1.0:
        raise ValueError(f"start + steps x step must stay below 1, got {shares[-1]:.2f}")
    cuts = [float(np.quantile(times, share, method="lower")) for share in shares]
    return Slices(events, [*cuts, float(times.max())])


def split_for(known: pd.DataFrame, next_events: pd.DataFrame, cfg: DictConfig) -> Split:
    """Train on everything ``known``; validation carved from it as the pipeline does;
    the next slice as test (scored separately, see :func:`score_next`)."""
    fit, validation = temporal_holdout(
        known, float(cfg.split.validation_fraction), int(cfg.split.min_interactions)
    )
    return Split(known, fit, validation, next_events, np.array([], dtype=object))


def score_next(
    module: TwoTowerModule, raw: RawData, known: pd.DataFrame, next_events: pd.DataFrame
) -> dict[str, float]:
    """The model's metrics on the next slice (users of the slice, histories and exclusions
    from ``known``, the model's own encoders), and popularity's (``popularity/...``)."""
    encoders = module.feature_encoders
    assert encoders is not None
    catalogue = raw.items.reset_index(drop=True)
    eval_set = build_eval_set(known, next_events, catalogue, raw.users, encoders)
    metrics = evaluate_module(module, encoders.item_inputs(catalogue), eval_set, KS)
    metrics.update(evaluate_popularity(eval_set, KS, "popularity/"))
    return metrics


def prepared(raw: RawData, split: Split, cfg: DictConfig, fit_on: str) -> PreparedData:
    return prepare_data(raw, split, feature_settings(cfg.features), fit_on)


def full_retrain(
    cfg: DictConfig, raw: RawData, split: Split, out: Path
) -> tuple[TwoTowerModule, int, Path]:
    """From scratch: early stopping on validation, then (``train.refit``) a refit on all
    of the data for the chosen epoch count. The model, its epoch count and checkpoint."""
    selection = fit_and_select(cfg, out, prepared(raw, split, cfg, "fit"))
    assert selection is not None and selection.best is not None
    epochs = int(torch.load(selection.best, map_location="cpu", weights_only=False)["epoch"]) + 1
    if not cfg.train.get("refit"):
        return selection.module, epochs, selection.best
    pl.seed_everything(cfg.seed, workers=True)
    checkpoints = out / "checkpoints" / "refit"
    module = train_for_epochs(cfg, prepared(raw, split, cfg, "train"), epochs, checkpoints)
    return module, epochs, checkpoints / "last.ckpt"


def warm_update(
    cfg: DictConfig,
    raw: RawData,
    split: Split,
    previous: Path,
    settings: ContinuousSettings,
    out: Path,
) -> tuple[TwoTowerModule, Path]:
    """``previous`` updated with the data of ``split`` (``init_from``), ``warm_epochs``
    epochs, no selection. The model and its checkpoint."""
    warm_cfg = OmegaConf.merge(cfg, {"init_from": str(previous)})
    if settings.window_days is not None:
        window = recent_window(split.train, settings.window_days)
        split = dataclasses.replace(split, train=window, fit=window)
    pl.seed_everything(cfg.seed, workers=True)
    module = train_for_epochs(
        warm_cfg, prepared(raw, split, warm_cfg, "train"), settings.warm_epochs, out
    )
    return module, out / "last.ckpt"


def timed(function: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def replay(
    name: str, cfg: DictConfig, settings: ContinuousSettings, workdir: Path
) -> list[dict[str, Any]]:
    """The whole replay on the data of ``cfg``: one row per step (step 0 is the first
    model, trained in full and scored on the first next slice)."""
    raw = load_data(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    slices = make_slices(raw, cfg, settings)
    rows: list[dict[str, Any]] = []
    warm_checkpoint: Path | None = None
    warm_module: TwoTowerModule | None = None
    for step in range(settings.steps + 1):
        known, next_events = slices.known(step), slices.next(step)
        split = split_for(known, next_events, cfg)
        log.info(
            "%s step %d: %d events up to %s, next slice %d events",
            name,
            step,
            len(known),
            pd.to_datetime(slices.cuts[step], unit="s").date(),
            len(next_events),
        )
        (full, epochs, full_checkpoint), full_s = timed(
            full_retrain, cfg, raw, split, workdir / f"step{step}" / "full"
        )
        row: dict[str, Any] = {
            "dataset": name,
            "step": step,
            "cut": str(pd.to_datetime(slices.cuts[step], unit="s").date()),
            "train_events": len(known),
            "next_events": len(next_events),
            "next_users": int(next_events[USER_ID].nunique()),
            "returning_users": int(
                next_events[USER_ID].drop_duplicates().isin(known[USER_ID]).sum()
            ),
            "full_epochs": epochs,
            "full_s": full_s,
        }
        scores = {"full": score_next(full, raw, known, next_events)}
        if warm_checkpoint is not None and warm_module is not None:
            scores["stale"] = score_next(warm_module, raw, known, next_events)
            (warm_module, warm_checkpoint), warm_s = timed(
                warm_update,
                cfg,
                raw,
                split,
                warm_checkpoint,
                settings,
                workdir / f"step{step}" / "warm",
            )
            scores["warm"] = score_next(warm_module, raw, known, next_events)
            row.update(warm_s=warm_s, warm_over_full=warm_s / full_s)
        else:  # the first model: the warm chain starts from it
            warm_module, warm_checkpoint = full, full_checkpoint
        for model, metrics in scores.items():
            for k in KS:
                for metric in ("recall", "ndcg"):
                    row[f"{model}_{metric}@{k}"] = metrics[f"{metric}@{k}"]
        for k in KS:
            row[f"popularity_ndcg@{k}"] = scores["full"][f"popularity/ndcg@{k}"]
        if "warm" in scores:
            row["warm_minus_full_ndcg@20"] = row["warm_ndcg@20"] - row["full_ndcg@20"]
        log.info("%s", {k: v for k, v in row.items() if not k.endswith(("@10", "@50"))})
        rows.append(row)
    return rows


def summary(rows: Sequence[dict[str, Any]], settings: ContinuousSettings) -> dict[str, Any]:
    """Per dataset: the mean and the worst warm - full NDCG@20 gap over the update steps,
    the mean time ratio, and whether the target (gap within ``target_ndcg_gap``) holds."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(row["dataset"] for row in rows):
        updates = [r for r in rows if r["dataset"] == name and "warm_s" in r]
        if not updates:
            continue
        gaps = [r["warm_minus_full_ndcg@20"] for r in updates]
        out[name] = {
            "steps": len(updates),
            "mean_gap": float(np.mean(gaps)),
            "worst_gap": float(min(gaps)),
            "mean_warm_over_full": float(np.mean([r["warm_over_full"] for r in updates])),
            "warm_s": float(np.sum([r["warm_s"] for r in updates])),
            "full_s": float(np.sum([r["full_s"] for r in updates])),
            "target_met": all(g >= -settings.target_ndcg_gap for g in gaps),
        }
    return out
