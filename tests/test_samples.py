"""Training samples: the history holds only items strictly before the target."""

from __future__ import annotations

import numpy as np
import pandas as pd

from retrieval.encoding import PAD_INDEX
from towers.data.samples import latest_histories, leakage_free_histories
from towers.data.schema import RawData
from towers.data.split import prepare_interactions


def test_no_history_item_is_at_or_after_its_target(tiny_data: RawData) -> None:
    events = prepare_interactions(tiny_data.interactions)
    # Force ties in time to check they are excluded too.
    events["timestamp"] = (events["timestamp"] // 50_000) * 50_000
    events = prepare_interactions(events)
    codes = np.arange(len(events)) + 2  # code = row + 2 to find each item's row again
    length = 10
    histories = leakage_free_histories(events, codes, length)
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
