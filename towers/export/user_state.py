"""The bundle's user table: each known user's recent history and seen items (all of
train), plus their attributes, built in Arrow from the id codes.

Train can hold tens of millions of events; as Python lists of strings the two list
columns alone took more memory than training (the 100M-event rung of the scale ladder
stopped there). Here they are Arrow list arrays cut from one string array of the train
items, in the layout (and with the pandas metadata) the pandas writer gave them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from towers.data.eval_sets import user_attribute_rows
from towers.data.ids import id_codes
from towers.data.prepare import PreparedData
from towers.data.samples import concatenated_ranges
from towers.data.schema import ITEM_ID, USER_ID
from twotower.bundle import layout


def _lists(values: pa.Array, lengths: np.ndarray, large: bool) -> pa.Array:
    """A list array whose row ``i`` holds the next ``lengths[i]`` of ``values`` (64-bit
    offsets when ``large``)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if large:
        return pa.LargeListArray.from_arrays(pa.array(offsets), values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def _pandas_metadata(attributes: pd.DataFrame | None) -> dict:
    """The schema metadata ``DataFrame.to_parquet`` writes for this table's columns (from
    a one-row frame of the same kinds), so readers get the dtypes they always got."""
    row: dict[str, object] = {USER_ID: ["u"], layout.HISTORY_COLUMN: [["i"]]}
    row[layout.SEEN_COLUMN] = [["i"]]
    frame = pd.DataFrame(row, dtype=object)
    if attributes is not None:
        frame = pd.concat([frame, attributes.iloc[:1].reset_index(drop=True)], axis=1)
    return pa.Table.from_pandas(frame, preserve_index=False).schema.metadata or {}


def user_state_table(data: PreparedData) -> pa.Table:
    """Each user of train (in order of first appearance) with their last
    ``history_length`` items and all their items in time order; then the users of the
    user table without events (empty lists); then the user table's attribute columns."""
    train = data.split.train
    user_codes, user_names = id_codes(train[USER_ID])
    item_codes, item_names = id_codes(train[ITEM_ID])
    group, appearing = pd.factorize(user_codes)  # users in order of first appearance
    if len(group) > 1 and (np.diff(group) < 0).any():
        order = np.argsort(group, kind="stable")  # each user's rows together, in row order
        item_codes = item_codes[order]
    lengths = np.bincount(group, minlength=len(appearing)).astype(np.int64)
    item_strings = pa.array(item_names.astype(str), pa.large_string())
    seen_values = pc.take(item_strings, pa.array(item_codes))
    ends = np.cumsum(lengths)
    starts = np.maximum(ends - data.encoders.history_length, ends - lengths)
    history_values = pc.take(seen_values, pa.array(concatenated_ranges(starts, ends)))
    known = np.asarray(user_names[appearing], dtype=object)
    user_ids = known
    large = len(item_codes) >= np.iinfo(np.int32).max  # past 32-bit list offsets
    history = _lists(history_values, ends - starts, large)
    seen = _lists(seen_values, lengths, large)
    attributes = None
    if data.users is not None:
        table_ids = data.users[USER_ID].to_numpy(dtype=object)
        extra = table_ids[pd.Index(known, dtype=object).get_indexer(table_ids) < 0]
        user_ids = np.concatenate([known, extra])
        empty = np.zeros(len(extra), dtype=np.int64)
        history = pa.concat_arrays([history, _lists(history_values.slice(0, 0), empty, large)])
        seen = pa.concat_arrays([seen, _lists(seen_values.slice(0, 0), empty, large)])
        attributes = user_attribute_rows(data.users, user_ids)
        assert attributes is not None
        attributes = attributes.drop(columns=[USER_ID])
    columns: dict[str, pa.Array] = {
        USER_ID: pa.array(user_ids.astype(str), pa.string()),
        layout.HISTORY_COLUMN: history,
        layout.SEEN_COLUMN: seen,
    }
    table = pa.table(columns)
    if attributes is not None:
        extra_columns = pa.Table.from_pandas(attributes, preserve_index=False)
        for name, column in zip(extra_columns.column_names, extra_columns.columns, strict=True):
            table = table.append_column(name, column)
    return table.replace_schema_metadata(_pandas_metadata(attributes))


def write_user_state(data: PreparedData, path: str) -> pa.Table:
    """Write :func:`user_state_table` to the Parquet file ``path``; return the table."""
    import pyarrow.parquet as pq

    table = user_state_table(data)
    pq.write_table(table, path)
    return table
