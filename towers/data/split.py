"""Splits exactly as in EVALUATION.md: per-user temporal hold-out and the cold-item variant."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from towers.data.ids import distinct_in_order, id_codes, positions_in
from towers.data.samples import group_bounds
from towers.data.schema import ITEM_ID, RATING, TIMESTAMP, USER_ID
from twotower.errors import EmptyTableError

log = logging.getLogger(__name__)

SORT_KEY = "_item_order"
SECONDS_PER_DAY = 86_400.0


def item_order_key(item_ids: pd.Series) -> np.ndarray:
    """Tie-break key: item ids ordered as integers when every id present is an integer,
    else as strings (the codes of :func:`towers.data.ids.id_codes`); integer codes that sort as
    the ids do, not the ids."""
    codes, ids = id_codes(item_ids)
    used = np.bincount(codes, minlength=len(ids)) > 0  # ids of rows filtered out do not count
    as_str = pd.Series(ids[used], dtype=object).astype(str)
    if as_str.str.fullmatch(r"[+-]?\d+").all():
        # the integers' order as small ranks (equal integers, such as "01" and "1", tie)
        ranks = np.zeros(len(ids), dtype=np.int64)
        ranks[used] = np.unique(as_str.astype(np.int64).to_numpy(), return_inverse=True)[1]
        return ranks.astype(codes.dtype)[codes]
    return codes


def chronological_order(events: pd.DataFrame) -> np.ndarray | None:
    """The stable order by (user, timestamp, item order) of ``events`` (the item order
    from their ``SORT_KEY`` column, if any), or ``None`` when they are in that order."""
    item_key = events[SORT_KEY] if SORT_KEY in events.columns else item_order_key(events[ITEM_ID])
    keys = (
        np.asarray(item_key),
        events[TIMESTAMP].to_numpy(),
        id_codes(events[USER_ID])[0],
    )
    item_key, times, users = keys
    if len(users) < 2:
        return None
    step_user, step_time = np.diff(users), np.diff(times)
    in_order = (step_user > 0) | (
        (step_user == 0) & ((step_time > 0) | ((step_time == 0) & (np.diff(item_key) >= 0)))
    )
    del step_user, step_time
    if in_order.all():
        return None
    return np.lexsort(keys)


def in_chronological_order(events: pd.DataFrame) -> pd.DataFrame:
    """``events`` sorted by (user, timestamp, item order), stably (a merge sort's order)."""
    order = chronological_order(events)
    return events if order is None else events.take(order)


def repeated_pairs(events: pd.DataFrame) -> np.ndarray:
    """Mask of the rows whose (user, item) pair appeared on an earlier row."""
    users = id_codes(events[USER_ID])[0]
    items = id_codes(events[ITEM_ID])[0]
    order = np.lexsort((items, users))  # stable: equal pairs keep their row order
    same = (users[order[1:]] == users[order[:-1]]) & (items[order[1:]] == items[order[:-1]])
    repeated = np.zeros(len(users), dtype=bool)
    repeated[order[1:][same]] = True
    return repeated


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
    events = in_chronological_order(events.assign(**{SORT_KEY: item_order_key(events[ITEM_ID])}))
    repeated = repeated_pairs(events)
    if repeated.any():
        log.info(
            "kept the earliest of repeated (user, item) pairs: %d -> %d",
            len(events),
            len(events) - int(repeated.sum()),
        )
        events = events.loc[~repeated]
    events = events.reset_index(drop=True)
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
    ordered = in_chronological_order(events)
    first, end = group_bounds(id_codes(ordered[USER_ID])[0])  # a user's rows are contiguous
    sizes = end - first
    rank = np.arange(len(first)) - first
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
    items = np.sort(distinct_in_order(events[ITEM_ID]).astype(str))
    n_cold = round(fraction * len(items))
    cold = np.sort(np.random.default_rng(seed).choice(items, size=n_cold, replace=False))
    is_cold = positions_in(pd.Index(cold.astype(object)), events[ITEM_ID]) >= 0
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
    # the tie-break key has done its work (each part is in order): a column less per row
    train, fit, validation, test = (
        part.drop(columns=[SORT_KEY], errors="ignore") for part in (train, fit, validation, test)
    )
    return Split(train, fit, validation, test, cold)
