"""Splits exactly as in EVALUATION.md: per-user temporal hold-out and the cold-item variant."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from towers.data.schema import ITEM_ID, RATING, TIMESTAMP, USER_ID
from twotower.errors import EmptyTableError

log = logging.getLogger(__name__)

SORT_KEY = "_item_order"
SECONDS_PER_DAY = 86_400.0


def item_order_key(item_ids: pd.Series) -> pd.Series:
    """Tie-break key: item ids as integers when every id is an integer, else as strings."""
    as_str = item_ids.astype(str)
    if as_str.str.fullmatch(r"[+-]?\d+").all():
        return as_str.astype(np.int64)
    return as_str


def prepare_interactions(
    interactions: pd.DataFrame, min_rating: float | None = None
) -> pd.DataFrame:
    """Implicit positives: optional rating threshold, then each (user, item) kept once,
    at its earliest time. Rows come back sorted by (user, timestamp, item order)."""
    events = interactions
    if min_rating is not None:
        if RATING not in events.columns:
            raise EmptyTableError("min_rating is set but the interactions have no 'rating' column")
        events = events.loc[events[RATING] >= min_rating]
    events = events.assign(**{SORT_KEY: item_order_key(events[ITEM_ID])})
    events = events.sort_values([USER_ID, TIMESTAMP, SORT_KEY], kind="mergesort")
    before = len(events)
    events = events.drop_duplicates([USER_ID, ITEM_ID], keep="first").reset_index(drop=True)
    if len(events) < before:
        log.info("kept the earliest of repeated (user, item) pairs: %d -> %d", before, len(events))
    if events.empty:
        raise EmptyTableError("no interactions left after the rating threshold")
    return events


def recent_window(interactions: pd.DataFrame, days: float) -> pd.DataFrame:
    """The interactions of the last ``days`` days: those at most ``days * 86400`` seconds
    before the newest one (``train.window_days``, for retraining on recent data only)."""
    if days <= 0:
        raise ValueError(f"train.window_days must be positive, got {days}")
    if interactions.empty:
        return interactions
    times = interactions[TIMESTAMP]
    kept = interactions.loc[times >= times.max() - days * SECONDS_PER_DAY]
    log.info("window of the last %g days: %d of %d interactions", days, len(kept), len(times))
    if kept.empty:
        raise EmptyTableError(f"no interactions in the last {days} days")
    return kept


def temporal_holdout(
    events: pd.DataFrame, fraction: float, min_interactions: int = 5
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per user with at least ``min_interactions`` events, the last ``max(1, round(fraction*n))``
    (ordered by timestamp, then item order) are held out; everyone else stays in the kept part.

    ``events`` must come from :func:`prepare_interactions` (sorted, with the order key).
    """
    ordered = events.sort_values([USER_ID, TIMESTAMP, SORT_KEY], kind="mergesort")
    sizes = ordered.groupby(USER_ID, sort=False)[ITEM_ID].transform("size").to_numpy()
    rank = ordered.groupby(USER_ID, sort=False).cumcount().to_numpy()
    n_held = np.where(sizes >= min_interactions, np.maximum(1, np.round(fraction * sizes)), 0)
    held = rank >= sizes - n_held
    return ordered.loc[~held].reset_index(drop=True), ordered.loc[held].reset_index(drop=True)


@dataclass
class Split:
    """Train (split again into fit + validation) and test interactions."""

    train: pd.DataFrame
    fit: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    cold_items: np.ndarray

    def stats(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "fit": len(self.fit),
            "validation": len(self.validation),
            "test": len(self.test),
            "test_users": int(self.test[USER_ID].nunique()),
            "validation_users": int(self.validation[USER_ID].nunique()),
            "cold_items": len(self.cold_items),
        }


def cold_item_holdout(
    events: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Pick ``round(fraction * n_items)`` interacted items at random (seeded); all their
    interactions leave train and form the test set."""
    items = np.sort(events[ITEM_ID].unique().astype(str))
    n_cold = round(fraction * len(items))
    cold = np.sort(np.random.default_rng(seed).choice(items, size=n_cold, replace=False))
    is_cold = events[ITEM_ID].isin(set(cold)).to_numpy()
    return (
        events.loc[~is_cold].reset_index(drop=True),
        events.loc[is_cold].reset_index(drop=True),
        cold,
    )


def make_split(
    events: pd.DataFrame,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.1,
    min_interactions: int = 5,
    cold_items: bool = False,
    cold_fraction: float = 0.1,
    seed: int = 42,
) -> Split:
    """The EVALUATION.md split; validation is carved from train "the same way": by the
    temporal rule, or in the cold-item variant by holding out ``cold_fraction`` of train's
    items (seed + 1), so that model selection is on cold items too."""
    if cold_items:
        train, test, cold = cold_item_holdout(events, cold_fraction, seed)
        fit, validation, _ = cold_item_holdout(train, cold_fraction, seed + 1)
    else:
        train, test = temporal_holdout(events, test_fraction, min_interactions)
        cold = np.array([], dtype=object)
        fit, validation = temporal_holdout(train, validation_fraction, min_interactions)
    for name, part in (("train", train), ("test", test), ("validation", validation)):
        if part.empty:
            raise EmptyTableError(f"the {name} split is empty: too few interactions per user")
    return Split(train, fit, validation, test, cold)
