"""Training samples without leakage: each event with the user's last L items strictly before
it (``history_windows`` over ``history_bounds``; ties in time are excluded)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from towers.data.ids import id_codes
from towers.data.schema import TIMESTAMP, USER_ID
from twotower.encoding import PAD_INDEX


def history_windows(
    item_codes: np.ndarray, starts: np.ndarray, ends: np.ndarray, length: int
) -> np.ndarray:
    """(n, length) matrix of ``item_codes[max(start, end - length):end]`` per row, left-padded
    with ``PAD_INDEX`` so the most recent item is last."""
    if length == 0:
        return np.zeros((len(ends), 0), dtype=np.int64)
    positions = ends[:, None] - length + np.arange(length)[None, :]
    valid = positions >= starts[:, None]
    return np.where(valid, item_codes[np.clip(positions, 0, None)], PAD_INDEX).astype(np.int64)


def runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``keys`` in runs of equal values: each run's first and one-past-last position."""
    change = np.ones(len(keys), dtype=bool)
    change[1:] = keys[1:] != keys[:-1]
    first = np.flatnonzero(change)
    return first, np.append(first[1:], len(keys))


def position_dtype(n: int) -> type[np.integer]:
    """The integer type of positions (or codes) below ``n``: int32 when they fit (half
    the memory of an array of every row), else int64."""
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def ascending(values: np.ndarray, chunk: int = 1 << 22) -> bool:
    """Whether ``values`` never decrease (checked a few million at a time, without a
    temporary the size of ``values``)."""
    for lo in range(0, max(len(values) - 1, 0), chunk):
        piece = values[lo : lo + chunk + 1]
        if (piece[1:] < piece[:-1]).any():
            return False
    return True


def group_bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sorted ``keys``: first and one-past-last position of each row's run of equal keys."""
    first, end = runs(keys)
    run_of_row = np.repeat(np.arange(len(first)), end - first)
    return first[run_of_row], end[run_of_row]


def concatenated_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The positions ``starts[i]..ends[i]-1`` of every row, one after the other
    (``np.concatenate([np.arange(s, e) ...])`` without a Python loop)."""
    lengths = ends - starts
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)


def history_bounds(events: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """For every row of ``events`` (sorted by user, then time): the position of the user's
    first event and of the first event at the row's timestamp (its history ends there);
    int32 when the positions fit (4 bytes a row, not 8), else int64."""
    users = id_codes(events[USER_ID])[0]
    times = events[TIMESTAMP].to_numpy()
    # a user's events at one moment are contiguous: a new moment starts where the user
    # or the time changes
    new_user = np.ones(len(events), dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    new_moment = new_user.copy()
    new_moment[1:] |= times[1:] != times[:-1]
    return _run_starts(new_user), _run_starts(new_moment)


def _run_starts(starts_run: np.ndarray) -> np.ndarray:
    """Each row's run's first position, for runs starting where ``starts_run`` is true
    (row 0 starts one): a running maximum of the starts, in place."""
    starts = np.arange(len(starts_run), dtype=position_dtype(len(starts_run)))
    starts[~starts_run] = 0
    np.maximum.accumulate(starts, out=starts)
    return starts


@dataclass(frozen=True)
class HistorySource:
    """What rebuilds each training sample's history: the fit events' item codes and, per
    sample, where its user's events start and where its leakage-free history ends."""

    item_codes: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    length: int

    def windows(self, positions: np.ndarray, horizon: int, rng: np.random.Generator) -> np.ndarray:
        """Histories of the samples at ``positions``, each cut ``0..horizon-1`` (uniform)
        further events before its target, so that the model learns to find items that
        come up to ``horizon`` events later, not just the next one (what a hold-out of a
        user's next 20% asks). ``horizon=1`` gives the plain leakage-free histories."""
        starts, ends = self.starts[positions], self.ends[positions]
        if horizon > 1:
            ends = np.maximum(ends - rng.integers(0, horizon, len(positions)), starts)
        return history_windows(self.item_codes, starts, ends, self.length)


def latest_histories(
    events: pd.DataFrame, item_codes: np.ndarray, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's last ``length`` item codes over all of ``events`` (sorted by user, time).

    Returns the user ids (in order of appearance) and the (n_users, length) histories.
    """
    codes, uniques = pd.factorize(events[USER_ID])
    start, end = group_bounds(codes)
    first = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    return np.asarray(uniques, dtype=object), history_windows(
        item_codes, start[first], end[first], length
    )


def user_activity_weights(user_starts: np.ndarray, power: float) -> np.ndarray:
    """Per-sample weight ``n_u ** -power`` (``n_u``: the sample's user's event count, users
    told apart by ``user_starts``), scaled to mean 1. ``power=0`` weights every event
    alike, so heavy users dominate the loss; ``power=1`` weights every user alike, as the
    ranking metrics (averaged over users) do."""
    if power == 0:
        return np.ones(len(user_starts), dtype=np.float32)
    _, inverse, counts = np.unique(user_starts, return_inverse=True, return_counts=True)
    weights = counts[inverse].astype(np.float64) ** -power
    return (weights / weights.mean()).astype(np.float32)
