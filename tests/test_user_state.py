"""The bundle's user table, built in Arrow from id codes, reads back as the pandas
writer's did: same users, order, lists, attributes and dtypes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from towers.data.eval_sets import user_attribute_rows
from towers.data.prepare import FeatureSettings, PreparedData, prepare_data
from towers.data.schema import ITEM_ID, USER_ID, RawData
from towers.data.split import make_split, prepare_interactions
from towers.export.user_state import write_user_state
from twotower.bundle import layout


def pandas_user_state(data: PreparedData) -> pd.DataFrame:
    """The table as it was built before: Python lists, grouped by pandas."""
    train = data.split.train
    length = data.encoders.history_length
    seen = train.groupby(USER_ID, sort=False)[ITEM_ID].agg(list)
    state = pd.DataFrame(
        {
            USER_ID: seen.index.to_numpy(dtype=object),
            layout.HISTORY_COLUMN: [items[-length:] if length else [] for items in seen],
            layout.SEEN_COLUMN: seen.to_list(),
        }
    )
    if data.users is not None:
        extra = data.users.loc[~data.users[USER_ID].isin(set(state[USER_ID]))]
        empty = [[]] * len(extra)
        state = pd.concat(
            [
                state,
                pd.DataFrame(
                    {
                        USER_ID: extra[USER_ID],
                        layout.HISTORY_COLUMN: empty,
                        layout.SEEN_COLUMN: empty,
                    }
                ),
            ],
            ignore_index=True,
        )
        attributes = user_attribute_rows(data.users, state[USER_ID].to_numpy(dtype=object))
        assert attributes is not None
        state = pd.concat([state, attributes.drop(columns=[USER_ID])], axis=1)
    return state


@pytest.mark.parametrize(
    ("history_length", "shuffle", "unlisted"),
    [(0, False, False), (3, False, False), (0, True, False), (3, True, False), (3, False, True)],
)
def test_user_table_reads_back_as_the_pandas_one(
    tiny_data: RawData, tmp_path: Path, history_length: int, shuffle: bool, unlisted: bool
) -> None:
    users = pd.concat(  # a user with attributes and no events
        [tiny_data.users, tiny_data.users.iloc[:1].assign(user_id="nobody")], ignore_index=True
    )
    # a text column missing for whole chunks of users: every chunk keeps the table's types
    nicknames = [None if n < 40 else f"nick{n}" for n in range(len(users))]
    users["nickname"] = pd.Series(nicknames, dtype=object)
    if unlisted:  # users with events but no row in the table: missing attributes
        users = users.iloc[3:].sample(frac=1.0, random_state=0).reset_index(drop=True)
    raw = dataclasses.replace(tiny_data, users=users)
    split = make_split(prepare_interactions(raw.interactions))
    if shuffle:  # users interleaved, each user's rows still in time order
        order = np.random.default_rng(0).permutation(len(split.train))
        train = split.train.take(order).sort_values("timestamp", kind="stable")
        split = dataclasses.replace(split, train=train)
    data = prepare_data(raw, split, FeatureSettings(history_length=history_length))
    pandas_user_state(data).to_parquet(tmp_path / "pandas.parquet", index=False)
    # a few users per chunk: the chunks' lists and attributes line up as one table's
    rows = write_user_state(data, str(tmp_path / "arrow.parquet"), users_per_chunk=7)
    expected = pd.read_parquet(tmp_path / "pandas.parquet")
    got = pd.read_parquet(tmp_path / "arrow.parquet")
    assert rows == len(expected) and "nobody" in set(got[USER_ID])
    write_user_state(data, str(tmp_path / "whole.parquet"), users_per_chunk=10**6)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "whole.parquet"), got)
    assert list(got.columns) == list(expected.columns)
    assert got.dtypes.to_dict() == expected.dtypes.to_dict()
    if unlisted:  # the attribute columns of the unlisted users are missing
        assert (
            got.drop(columns=[USER_ID, layout.HISTORY_COLUMN, layout.SEEN_COLUMN])
            .isna()
            .any()
            .all()
        )
    for column in (layout.HISTORY_COLUMN, layout.SEEN_COLUMN):
        assert [list(v) for v in got[column]] == [list(v) for v in expected[column]], column
    rest = [c for c in expected.columns if c not in (layout.HISTORY_COLUMN, layout.SEEN_COLUMN)]
    pd.testing.assert_frame_equal(got[rest], expected[rest])
