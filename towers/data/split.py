"""Splits exactly as in EVALUATION.md: per-user temporal hold-out and the cold-item variant."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from towers.data.ids import distinct_in_order, id_codes, positions_in
from towers.data.samples import ascending, group_bounds, runs
from towers.data.schema import ITEM_ID, RATING, TIMESTAMP, USER_ID
from twotower.encoding.vocabulary import code_counts
from twotower.errors import EmptyTableError

log = logging.getLogger(__name__)

SORT_KEY = "_item_order"
SECONDS_PER_DAY = 86_400.0
ORDER_CHUNK = 1 << 22  # rows checked or deduplicated at once


def item_order_key(item_ids: pd.Series) -> np.ndarray:
    """Tie-break key: item ids ordered as integers when every id present is an integer,
    else as strings (the codes of :func:`towers.data.ids.id_codes`); integer codes that sort as
    the ids do, not the ids."""
    codes, ids = id_codes(item_ids)
    used = code_counts(codes, len(ids)) > 0  # ids of rows filtered out do not count
    ranks = integer_ranks(ids, used)
    if ranks is None:
        return codes  # the ids' own order (a view, not a copy)
    return ranks.astype(codes.dtype)[codes]


def integer_ranks(ids: np.ndarray, used: np.ndarray) -> np.ndarray | None:
    """The ranks of the integers that ``ids`` (distinct strings, sorted; ``used``: those
    present in the rows) are, when every id present is one (equal integers, such as
    "01" and "1", tie), so that ties are broken by the integers' order; else None."""
    as_str = pd.Series(ids[used], dtype=object).astype(str)
    if not as_str.str.fullmatch(r"[+-]?\d+").all():
        return None
    ranks = np.zeros(len(ids), dtype=np.int64)
    ranks[used] = np.unique(as_str.astype(np.int64).to_numpy(), return_inverse=True)[1]
    return ranks


def id_order_ranks(ids: np.ndarray, used: np.ndarray) -> np.ndarray:
    """The tie-break rank of each of ``ids`` (distinct strings, sorted; ``used``: those
    present in the rows): :func:`integer_ranks` when every id present is an integer,
    else their positions."""
    ranks = integer_ranks(ids, used)
    return np.arange(len(ids), dtype=np.int64) if ranks is None else ranks


def chronological_order(
    events: pd.DataFrame, item_key: np.ndarray | None = None
) -> np.ndarray | None:
    """The stable order by (user, timestamp, item order) of ``events`` (the item order
    ``item_key``, else their ``SORT_KEY`` column if any, else :func:`item_order_key` of
    their items: integers when every item id among these rows is one), or ``None`` when
    they are in that order."""
    if item_key is None:
        item_key = (
            events[SORT_KEY] if SORT_KEY in events.columns else item_order_key(events[ITEM_ID])
        )
    keys = (
        np.asarray(item_key),
        events[TIMESTAMP].to_numpy(),
        id_codes(events[USER_ID])[0],
    )
    if _in_order(*keys):
        return None
    return np.lexsort(keys)


def _in_order(item_key: np.ndarray, times: np.ndarray, users: np.ndarray) -> bool:
    """Whether rows are sorted by (user, time, item key), checked a few million rows at a
    time (the steps between rows are temporaries of every row otherwise)."""
    for lo in range(0, max(len(users) - 1, 0), ORDER_CHUNK):
        hi = lo + ORDER_CHUNK + 1
        step_user = np.diff(users[lo:hi])
        step_time = np.diff(times[lo:hi])
        in_order = (step_user > 0) | (
            (step_user == 0)
            & ((step_time > 0) | ((step_time == 0) & (np.diff(item_key[lo:hi]) >= 0)))
        )
        if not in_order.all():
            return False
    return True


def rows_of(frame: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """The rows of ``frame`` at ``rows`` (positions, or a boolean mask) with a fresh
    ``RangeIndex``: ``frame.take(rows).reset_index(drop=True)`` without the index of the
    taken rows (8 bytes a row) ever being built."""
    columns = {name: frame[name].array[rows] for name in frame.columns}
    n_rows = int(np.count_nonzero(rows)) if rows.dtype == bool else len(rows)
    # copy=False: a DataFrame made from a dict copies its arrays by default
    return pd.DataFrame(columns, index=pd.RangeIndex(n_rows), columns=frame.columns, copy=False)


def in_chronological_order(events: pd.DataFrame) -> pd.DataFrame:
    """``events`` sorted by (user, timestamp, item order), stably (a merge sort's order)."""
    order = chronological_order(events)
    return events if order is None else events.take(order)


def repeated_pairs(events: pd.DataFrame) -> np.ndarray:
    """Mask of the rows whose (user, item) pair appeared on an earlier row. Rows sorted by
    user are looked at a few million (whole users) at a time."""
    users = id_codes(events[USER_ID])[0]
    items = id_codes(events[ITEM_ID])[0]
    repeated = np.zeros(len(users), dtype=bool)
    if not ascending(users):
        _mark_repeated(users, items, repeated)
        return repeated
    lo = 0
    while lo < len(users):
        hi = min(lo + ORDER_CHUNK, len(users))
        if hi < len(users):  # end the block with a whole user
            hi = lo + int(np.searchsorted(users[lo:], users[hi], side="left"))
            if hi == lo:  # one user longer than a block
                hi = lo + int(np.searchsorted(users[lo:], users[lo], side="right"))
        _mark_repeated(users[lo:hi], items[lo:hi], repeated[lo:hi])
        lo = hi
    return repeated


def _mark_repeated(users: np.ndarray, items: np.ndarray, repeated: np.ndarray) -> None:
    order = np.lexsort((items, users))  # stable: equal pairs keep their row order
    same = (users[order[1:]] == users[order[:-1]]) & (items[order[1:]] == items[order[:-1]])
    repeated[order[1:][same]] = True


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
    # sorted with the tie-break key beside the rows, not in a column copied with them
    order = chronological_order(events, item_order_key(events[ITEM_ID]))
    if order is not None:
        events = rows_of(events, order)
    del order
    repeated = repeated_pairs(events)
    if repeated.any():
        log.info(
            "kept the earliest of repeated (user, item) pairs: %d -> %d",
            len(events),
            len(events) - int(repeated.sum()),
        )
        events = rows_of(events, ~repeated)
    del repeated
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

    ``events`` must come from :func:`prepare_interactions` (in chronological order).
    """
    ordered = in_chronological_order(events)
    first, end = group_bounds(id_codes(ordered[USER_ID])[0])  # a user's rows are contiguous
    sizes = end - first
    rank = np.arange(len(first)) - first
    held = rank >= sizes - _held_counts(sizes, fraction, min_interactions)
    return ordered.loc[~held].reset_index(drop=True), ordered.loc[held].reset_index(drop=True)


@dataclass
class Split:
    """Train (split again into fit + validation) and test interactions."""

    train: pd.DataFrame
    fit: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    cold_items: np.ndarray
    train_kept: bool = True  # False: train left empty (``make_split(keep_train=False)``)

    def stats(self) -> dict[str, int]:
        return {
            "train": len(self.train) if self.train_kept else len(self.fit) + len(self.validation),
            "fit": len(self.fit),
            "validation": len(self.validation),
            "test": len(self.test),
            "test_users": int(self.test[USER_ID].nunique()),
            "validation_users": int(self.validation[USER_ID].nunique()),
            "cold_items": len(self.cold_items),
        }


def pick_cold_items(item_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``round(fraction * n)`` of the distinct ``item_ids`` (strings) at random (seeded),
    sorted."""
    items = np.sort(np.asarray(item_ids).astype(str))
    n_cold = round(fraction * len(items))
    return np.sort(np.random.default_rng(seed).choice(items, size=n_cold, replace=False))


def cold_item_holdout(
    events: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Pick ``round(fraction * n_items)`` interacted items at random (seeded); all their
    interactions leave train and form the test set."""
    cold = pick_cold_items(distinct_in_order(events[ITEM_ID]), fraction, seed)
    is_cold = positions_in(pd.Index(cold.astype(object)), events[ITEM_ID]) >= 0
    return (
        events.loc[~is_cold].reset_index(drop=True),
        events.loc[is_cold].reset_index(drop=True),
        cold,
    )


FIT, VALIDATION, TEST = 0, 1, 2
LABEL_CHUNK = 1 << 22  # rows labelled at once (bounded temporaries at any size)


def temporal_labels(
    events: pd.DataFrame, test_fraction: float, validation_fraction: float, min_interactions: int
) -> np.ndarray:
    """Each row's part (:data:`FIT`, :data:`VALIDATION` or :data:`TEST`, int8) under the
    temporal rule of :func:`temporal_holdout` applied twice (test from all events, then
    validation from the rest), for ``events`` in chronological order: per user with
    ``n >= min_interactions`` events the last ``max(1, round(test_fraction * n))`` are
    test, and the same rule on the ``m`` events left holds out validation."""
    first, end = runs(id_codes(events[USER_ID])[0])  # a user's rows are contiguous
    sizes = end - first
    n_test = _held_counts(sizes, test_fraction, min_interactions)
    n_train = sizes - n_test
    n_validation = _held_counts(n_train, validation_fraction, min_interactions)
    test_from, validation_from = first + n_train, first + n_train - n_validation
    labels = np.empty(len(events), dtype=np.int8)
    for lo in range(0, len(labels), LABEL_CHUNK):
        rows = np.arange(lo, min(lo + LABEL_CHUNK, len(labels)))
        run = np.searchsorted(first, rows, side="right") - 1
        labels[rows[0] : rows[-1] + 1] = np.where(
            rows >= test_from[run], TEST, np.where(rows >= validation_from[run], VALIDATION, FIT)
        )
    return labels


def _held_counts(sizes: np.ndarray, fraction: float, min_interactions: int) -> np.ndarray:
    """Rows held out of runs of ``sizes`` rows: ``max(1, round(fraction * n))`` of each
    run of at least ``min_interactions``, none of the others."""
    held = np.where(sizes >= min_interactions, np.maximum(1, np.round(fraction * sizes)), 0)
    return held.astype(np.int64)


def cold_labels(events: pd.DataFrame, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's part under the cold-item rule of :func:`cold_item_holdout` applied
    twice (test items from all items, seed; validation items from train's, seed + 1),
    and the test's cold items."""
    items = distinct_in_order(events[ITEM_ID])
    cold = pick_cold_items(items, fraction, seed)
    train_items = np.setdiff1d(np.asarray(items).astype(str), cold)
    cold_validation = pick_cold_items(train_items, fraction, seed + 1)
    labels = np.zeros(len(events), dtype=np.int8)
    labels[positions_in(pd.Index(cold_validation.astype(object)), events[ITEM_ID]) >= 0] = (
        VALIDATION
    )
    labels[positions_in(pd.Index(cold.astype(object)), events[ITEM_ID]) >= 0] = TEST
    return labels, cold


def make_split(
    events: pd.DataFrame,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.1,
    min_interactions: int = 5,
    cold_items: bool = False,
    cold_fraction: float = 0.1,
    seed: int = 42,
    keep_train: bool = True,
) -> Split:
    """The EVALUATION.md split; validation is carved from train "the same way": by the
    temporal rule, or in the cold-item variant by holding out ``cold_fraction`` of train's
    items (seed + 1), so that model selection is on cold items too.

    Each row of ``events`` (from :func:`prepare_interactions`, in chronological order;
    for the temporal rule other rows are sorted first, ties by :func:`item_order_key` of
    these rows) gets its part, then each part is taken in one pass. ``keep_train=False`` leaves
    ``Split.train`` empty (its columns only): for a job that needs the three parts alone
    (``twotower prepare`` trained on fit), without a copy of 90% of the events."""
    if cold_items:
        labels, cold = cold_labels(events, cold_fraction, seed)
    else:
        events = in_chronological_order(events)
        labels = temporal_labels(events, test_fraction, validation_fraction, min_interactions)
        cold = np.array([], dtype=object)
    counts = np.bincount(labels, minlength=3)
    for name, n in (
        ("train", counts[FIT] + counts[VALIDATION]),
        ("test", counts[TEST]),
        ("validation", counts[VALIDATION]),
    ):
        if n == 0:
            raise EmptyTableError(f"the {name} split is empty: too few interactions per user")
    if SORT_KEY in events.columns:  # a caller's tie-break column: each part is in order
        events = events.drop(columns=[SORT_KEY])
    fit, validation, test = (rows_of(events, labels == part) for part in (FIT, VALIDATION, TEST))
    train = rows_of(events, labels != TEST) if keep_train else events.iloc[:0]
    return Split(train.reset_index(drop=True), fit, validation, test, cold, keep_train)
