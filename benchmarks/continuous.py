"""Continuous retraining: warm-start updates against full retrains, replayed over time.

The interactions are cut in time: the first ``start`` share of the events (in time order)
trains the first model, then each step adds the next ``step`` share. At each step two
models are trained on everything up to the cut:

- **warm**: the previous step's warm model (the first model at the first step) updated
  with ``init_from`` (its weights shrunk and perturbed by ``warm_shrink`` and
  ``warm_perturb``, copied as they are by default): with ``warm_validation="none"`` for a
  fixed ``warm_epochs`` epochs (optionally on the last ``window_days`` days only), with no
  model selection (:func:`towers.pipeline.train_for_epochs`); with
  ``warm_validation="newer"`` the epoch count is chosen by early stopping on a validation
  held out of the events newer than the previous cut only (the previous model has trained
  on every older one), then the update is refitted on all of the data from ``init_from``
  for that many epochs;
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
from scipy.stats import bootstrap

from towers.data.eval_sets import build_eval_set
from towers.data.prepare import PreparedData, prepare_data
from towers.data.schema import TIMESTAMP, USER_ID, RawData
from towers.data.sources import load_data
from towers.data.split import (
    Split,
    in_chronological_order,
    prepare_interactions,
    recent_window,
    temporal_holdout,
)
from towers.evaluation.callback import module_scores_by_user
from towers.evaluation.ranking import evaluate_popularity
from towers.model.module import TwoTowerModule
from towers.model.warm_start import ShrinkPerturb
from towers.pipeline import feature_settings, fit_and_select, train_for_epochs

log = logging.getLogger(__name__)
KS = (10, 20, 50)
WARM_VALIDATIONS = ("none", "newer")


@dataclass
class ContinuousSettings:
    """One replay: where the first model's data ends, the step, how warm updates train."""

    start: float = 0.8
    step: float = 0.05
    steps: int = 3
    warm_epochs: int = 2
    # "none": warm_epochs epochs, no selection; "newer": epochs by early stopping on a
    # validation of the events after the previous cut, then a refit on all of them
    warm_validation: str = "none"
    window_days: float | None = None
    # shrink and perturb of the carried weights (init_shrink, init_perturb) in the warm
    # updates only; 1 and 0 copy them as they are
    warm_shrink: float = 1.0
    warm_perturb: float = 0.0
    # tower pairs of both models (the MovieLens presets train 3 or 7; 1 keeps the replay
    # within minutes on two CPU cores)
    ensemble: int = 1
    target_ndcg_gap: float = 0.01
    # 1: at each update also retrain in full from seed + 1, how far two full retrains
    # are apart on the same slice (the noise a gap is judged against); 0: skip it
    second_full: int = 1
    # resamples of the users of a slice for the 95% interval of a gap (scipy's BCa
    # bootstrap of the mean per-user difference)
    resamples: int = 2000

    def __post_init__(self) -> None:
        """Settings that would fail at the first update fail here, before any training."""
        if self.warm_validation not in WARM_VALIDATIONS:
            raise ValueError(
                f"warm_validation must be one of {WARM_VALIDATIONS}, got {self.warm_validation!r}"
            )
        ShrinkPerturb(self.warm_shrink, self.warm_perturb)  # raises WarmStartError if out of range


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


def split_for_warm(split: Split, since: float, cfg: DictConfig) -> Split:
    """``split`` with its validation held out of the events newer than ``since`` only (per
    user, the last ``cfg.split.validation_fraction`` of their newer events, as
    :func:`temporal_holdout` holds): a model trained on every event up to ``since`` has
    seen none of them, so early stopping on them measures what the update learns."""
    newer = split.train[TIMESTAMP] > since
    kept, validation = temporal_holdout(
        split.train.loc[newer],
        float(cfg.split.validation_fraction),
        int(cfg.split.min_interactions),
    )
    if validation.empty:
        raise ValueError(
            f"no user has {int(cfg.split.min_interactions)} events after the previous cut "
            "to validate a warm update on (split.min_interactions)"
        )
    fit = pd.concat([split.train.loc[~newer], kept], ignore_index=True)
    return dataclasses.replace(
        split, fit=in_chronological_order(fit).reset_index(drop=True), validation=validation
    )


def score_next(
    module: TwoTowerModule, raw: RawData, known: pd.DataFrame, next_events: pd.DataFrame
) -> tuple[dict[str, float], pd.Series]:
    """The model's metrics on the next slice (users of the slice, histories and exclusions
    from ``known``, the model's own encoders) with popularity's (``popularity/...``), and
    each user's NDCG@20 (indexed by user id, for paired gaps)."""
    encoders = module.feature_encoders
    assert encoders is not None
    catalogue = raw.items.reset_index(drop=True)
    eval_set = build_eval_set(known, next_events, catalogue, raw.users, encoders)
    users, values = module_scores_by_user(module, encoders.item_inputs(catalogue), eval_set, KS)
    metrics = {name: float(np.mean(per_user)) for name, per_user in values.items()}
    metrics.update(evaluate_popularity(eval_set, KS, "popularity/"))
    return metrics, pd.Series(values["ndcg@20"], index=pd.Index(users, name=USER_ID))


def mean_interval(values: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """The mean of ``values`` (per-user differences) and its 95% interval: scipy's BCa
    bootstrap over the users, ``resamples`` draws, seeded."""
    if len(values) < 2 or np.all(values == values[0]):  # no spread to resample
        mean = float(values.mean()) if len(values) else float("nan")
        return mean, mean, mean
    interval = bootstrap(
        (values,),
        np.mean,
        n_resamples=resamples,
        confidence_level=0.95,
        method="BCa",
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    return float(values.mean()), float(interval.low), float(interval.high)


def user_differences(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Per-user ``a - b``, aligned by user id: both models scored the same users (the
    slice's users with a target), anything else is an error."""
    if not a.index.sort_values().equals(b.index.sort_values()):
        raise ValueError(
            f"the two models scored different users ({len(a)} and {len(b)}): "
            "their evaluation sets should hold the same slice"
        )
    return (a - b.reindex(a.index)).to_numpy()


def prepared(raw: RawData, split: Split, cfg: DictConfig, fit_on: str) -> PreparedData:
    return prepare_data(raw, split, feature_settings(cfg.features), fit_on)


def select_and_refit(
    cfg: DictConfig, raw: RawData, split: Split, out: Path
) -> tuple[TwoTowerModule, int, Path]:
    """As the pipeline trains (from scratch, or from ``cfg.init_from``): early stopping on
    validation, then (``train.refit``) a refit on all of the data for the chosen epoch
    count. The model, its epoch count and checkpoint."""
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
    since: float,
    settings: ContinuousSettings,
    out: Path,
) -> tuple[TwoTowerModule, Path, int]:
    """``previous`` (trained on the events up to ``since``) updated with the data of
    ``split`` (``init_from``): ``warm_epochs`` epochs without selection, or, with
    ``warm_validation="newer"``, as many as early stopping picks on the newer events
    (:func:`split_for_warm`), then refitted. The model, its checkpoint and its epoch count."""
    warm_cfg = OmegaConf.merge(
        cfg,
        {
            "init_from": str(previous),
            "init_shrink": settings.warm_shrink,
            "init_perturb": settings.warm_perturb,
        },
    )
    if settings.window_days is not None:
        window = recent_window(split.train, settings.window_days)
        split = dataclasses.replace(split, train=window, fit=window)
    if settings.warm_validation == "newer":
        module, epochs, checkpoint = select_and_refit(
            warm_cfg, raw, split_for_warm(split, since, cfg), out
        )
        return module, checkpoint, epochs
    pl.seed_everything(cfg.seed, workers=True)
    module = train_for_epochs(
        warm_cfg, prepared(raw, split, warm_cfg, "train"), settings.warm_epochs, out
    )
    return module, out / "last.ckpt", settings.warm_epochs


def timed(function: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def replay(
    name: str, cfg: DictConfig, settings: ContinuousSettings, workdir: Path
) -> tuple[list[dict[str, Any]], dict[str, tuple[float, float, float]]]:
    """The whole replay on the data of ``cfg``: one row per step (step 0 is the first
    model, trained in full and scored on the first next slice), and the gaps to the
    full retrain over every update's users pooled (``warm``, ``full_b``: the mean
    per-user NDCG@20 difference and its 95% interval)."""
    raw = load_data(OmegaConf.to_container(cfg.data, resolve=True))  # type: ignore[arg-type]
    slices = make_slices(raw, cfg, settings)
    rows: list[dict[str, Any]] = []
    gaps: dict[str, list[np.ndarray]] = {"warm": [], "full_b": []}
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
            select_and_refit, cfg, raw, split, workdir / f"step{step}" / "full"
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
            (warm_module, warm_checkpoint, warm_epochs), warm_s = timed(
                warm_update,
                cfg,
                raw,
                split,
                warm_checkpoint,
                slices.cuts[step - 1],
                settings,
                workdir / f"step{step}" / "warm",
            )
            scores["warm"] = score_next(warm_module, raw, known, next_events)
            row.update(warm_epochs=warm_epochs, warm_s=warm_s, warm_over_full=warm_s / full_s)
            if settings.second_full:
                second_cfg = OmegaConf.merge(cfg, {"seed": int(cfg.seed) + 1})
                (second, _, _), row["full_b_s"] = timed(
                    select_and_refit, second_cfg, raw, split, workdir / f"step{step}" / "full_b"
                )
                scores["full_b"] = score_next(second, raw, known, next_events)
        else:  # the first model: the warm chain starts from it
            warm_module, warm_checkpoint = full, full_checkpoint
        for model, (metrics, _) in scores.items():
            for k in KS:
                for metric in ("recall", "ndcg"):
                    row[f"{model}_{metric}@{k}"] = metrics[f"{metric}@{k}"]
        for k in KS:
            row[f"popularity_ndcg@{k}"] = scores["full"][0][f"popularity/ndcg@{k}"]
        per_user = {model: users for model, (_, users) in scores.items()}
        for model in ("warm", "full_b"):
            if model in per_user:
                differences = user_differences(per_user[model], per_user["full"])
                gap, low, high = mean_interval(differences, settings.resamples, seed=step)
                row[f"{model}_minus_full_ndcg@20"] = gap
                row[f"{model}_minus_full_low"], row[f"{model}_minus_full_high"] = low, high
                gaps[model].append(differences)
        log.info("%s", {k: v for k, v in row.items() if not k.endswith(("@10", "@50"))})
        rows.append(row)
    pooled = {
        model: mean_interval(np.concatenate(differences), settings.resamples)
        for model, differences in gaps.items()
        if differences
    }
    return rows, pooled


def summary(
    rows: Sequence[dict[str, Any]],
    settings: ContinuousSettings,
    pooled: dict[str, dict[str, tuple[float, float, float]]],
) -> dict[str, Any]:
    """Per dataset: the mean and the worst warm - full NDCG@20 gap over the update steps,
    the mean time ratio, whether the target (every gap within ``target_ndcg_gap``) holds;
    from ``pooled`` (:func:`replay`'s second result, by dataset), the gap over every
    update's users with its 95% interval and whether that interval lies above
    ``-target_ndcg_gap``; with a second full retrain, how far it is from the first."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(row["dataset"] for row in rows):
        updates = [r for r in rows if r["dataset"] == name and "warm_s" in r]
        if not updates:
            continue
        gaps = [r["warm_minus_full_ndcg@20"] for r in updates]
        total: dict[str, Any] = {
            "steps": len(updates),
            "mean_gap": float(np.mean(gaps)),
            "worst_gap": float(min(gaps)),
            "mean_warm_over_full": float(np.mean([r["warm_over_full"] for r in updates])),
            "warm_s": float(np.sum([r["warm_s"] for r in updates])),
            "full_s": float(np.sum([r["full_s"] for r in updates])),
            "target_met": all(g >= -settings.target_ndcg_gap for g in gaps),
        }
        by_model = pooled.get(name, {})
        if "warm" in by_model:
            total["pooled_gap"] = list(by_model["warm"])
            total["pooled_above_target"] = by_model["warm"][1] >= -settings.target_ndcg_gap
        if "full_b" in by_model:
            seconds = [abs(r["full_b_minus_full_ndcg@20"]) for r in updates]
            total["full_b_pooled_gap"] = list(by_model["full_b"])
            total["full_b_mean_abs_gap"] = float(np.mean(seconds))
            total["full_b_worst_abs_gap"] = float(max(seconds))
        out[name] = total
    return out
