"""Training samples: the history holds only items strictly before the target."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from towers.data.samples import (
    HistorySource,
    history_bounds,
    history_windows,
    latest_histories,
    user_activity_weights,
)
from towers.data.schema import RawData
from towers.data.split import prepare_interactions
from twotower.encoding import PAD_INDEX


def test_no_history_item_is_at_or_after_its_target(tiny_data: RawData) -> None:
    events = prepare_interactions(tiny_data.interactions)
    # Force ties in time to check they are excluded too.
    events["timestamp"] = (events["timestamp"] // 50_000) * 50_000
    events = prepare_interactions(events)
    codes = np.arange(len(events)) + 2  # code = row + 2 to find each item's row again
    length = 10
    histories = history_windows(codes, *history_bounds(events), length)
    times = events["timestamp"].to_numpy()
    users = events["user_id"].to_numpy()
    for row in range(len(events)):
        past = histories[row][histories[row] != PAD_INDEX] - 2
        assert (times[past] < times[row]).all()
        assert (users[past] == users[row]).all()
        earlier = np.flatnonzero((users == users[row]) & (times < times[row]))
        assert list(past) == list(earlier[-length:])


def test_latest_histories_take_each_users_last_items() -> None:
    events = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b"],
            "item_id": list("wxyz"),
            "timestamp": [1.0, 2.0, 3.0, 1.0],
        }
    )
    users, histories = latest_histories(events, np.array([2, 3, 4, 5]), 2)
    assert list(users) == ["a", "b"]
    np.testing.assert_array_equal(histories, [[3, 4], [PAD_INDEX, 5]])


def test_target_horizon_cuts_histories_up_to_h_minus_1_events_earlier() -> None:
    codes = np.arange(2, 12)  # one user, 10 events
    starts, ends = np.zeros(10, dtype=np.int64), np.arange(10)
    source = HistorySource(codes, starts, ends, length=10)
    positions = np.repeat(np.arange(10), 50)
    windows = source.windows(positions, horizon=4, rng=np.random.default_rng(0))
    lengths = (windows != PAD_INDEX).sum(axis=1)
    cut = ends[positions] - lengths
    assert cut.min() == 0 and cut.max() == 3  # every cut 0..3 occurs
    assert (lengths >= 0).all() and (lengths <= ends[positions]).all()
    for row in range(len(positions)):  # still the most recent items before the cut
        kept = windows[row][windows[row] != PAD_INDEX]
        np.testing.assert_array_equal(kept, codes[: lengths[row]])
    plain = source.windows(np.arange(10), horizon=1, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(plain, history_windows(codes, starts, ends, 10))


def test_user_activity_weights_balance_users_at_power_one() -> None:
    starts = np.array([0, 0, 0, 0, 4, 6, 6])  # users with 4, 1 and 2 events
    flat = user_activity_weights(starts, 0.0)
    np.testing.assert_array_equal(flat, np.ones(7))
    balanced = user_activity_weights(starts, 1.0)
    assert balanced.mean() == pytest.approx(1.0)
    per_user = [balanced[starts == s].sum() for s in (0, 4, 6)]
    np.testing.assert_allclose(per_user, per_user[0])
    half = user_activity_weights(starts, 0.5)
    assert half[0] < half[5] < half[4]


def test_distinct_codes_sorted_or_not() -> None:
    """Sample users from runs of sorted codes, or by ``np.unique`` otherwise: the same."""
    from towers.data.prepare import distinct_codes

    rng = np.random.default_rng(0)
    for codes in (np.sort(rng.integers(0, 50, 500)), rng.integers(0, 50, 500)):
        codes = codes.astype(np.int32)
        present, inverse = distinct_codes(codes)
        want_present, want_inverse = np.unique(codes, return_inverse=True)
        np.testing.assert_array_equal(present, want_present)
        np.testing.assert_array_equal(inverse, want_inverse)
