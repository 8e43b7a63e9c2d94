"""The bundle's user table: each known user's recent history and seen items (all of
train), plus their attributes, built in Arrow from the id codes.

Train can hold tens of millions of events; as Python lists of strings the two list
columns alone took more memory than training (the 100M-event rung of the scale ladder
stopped there). Here they are Arrow list arrays cut from one string array of the train
items, in the layout (and with the pandas metadata) the pandas writer gave them, and
written a million users at a time, so only one chunk's item strings exist at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from towers.data.eval_sets import user_attribute_rows
from towers.data.ids import id_codes
from towers.data.prepare import PreparedData
from towers.data.samples import concatenated_ranges, runs
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


USERS_PER_CHUNK = 1_000_000


def _user_runs(user_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The users of ``user_codes`` in order of first appearance, their row counts, and the
    order that puts each user's rows together (None: they already are, as in a split's
    parts, which are in user order)."""
    first, end = runs(user_codes)
    run_users = user_codes[first]
    if len(np.unique(run_users)) == len(run_users):  # one run per user: no reordering
        return run_users, (end - first).astype(np.int64), None
    group, appearing = pd.factorize(user_codes)
    order = np.argsort(group, kind="stable")  # each user's rows together, in row order
    return appearing, np.bincount(group, minlength=len(appearing)).astype(np.int64), order


class _UserAttributes:
    """The user table's attribute columns for the known users (in their order), then for
    the table's users without events (``extra``), taken a range of users at a time
    rather than as a reindexed copy of the whole table."""

    def __init__(self, users: pd.DataFrame, known: np.ndarray) -> None:
        self.users = users
        self.known = known
        table_ids = pd.Index(users[USER_ID], dtype=object)
        self._known_rows = table_ids.get_indexer(known)
        extra_rows = np.flatnonzero(pd.Index(known, dtype=object).get_indexer(table_ids) < 0)
        self.extra = users[USER_ID].to_numpy(dtype=object)[extra_rows]
        self._rows = np.concatenate([self._known_rows, extra_rows])
        # a known user missing from the table gets missing attributes, which can change
        # the columns' types (ints become floats): then the whole table is reindexed once,
        # so that every range has the same types
        self._whole: pd.DataFrame | None = None
        if (self._known_rows < 0).any():
            whole = user_attribute_rows(users, np.concatenate([known, self.extra]))
            assert whole is not None
            self._whole = whole.drop(columns=[USER_ID])
        # the Arrow types of the whole table's columns, so that a chunk whose values of an
        # object column are all missing is not typed apart from the others
        every = self._whole if self._whole is not None else users.drop(columns=[USER_ID])
        self.schema = pa.Schema.from_pandas(every, preserve_index=False)

    def rows(self, lo: int, hi: int) -> pd.DataFrame:
        """Attribute columns of users ``lo..hi-1`` (known users, then extra ones)."""
        if self._whole is not None:
            return self._whole.iloc[lo:hi].reset_index(drop=True)
        frame = self.users.iloc[self._rows[lo:hi]].reset_index(drop=True)
        return frame.drop(columns=[USER_ID])

    def table(self, lo: int, hi: int) -> pa.Table:
        """:meth:`rows` as an Arrow table of the whole table's types."""
        return pa.Table.from_pandas(self.rows(lo, hi), schema=self.schema, preserve_index=False)


def user_state_chunks(
    data: PreparedData, users_per_chunk: int = USERS_PER_CHUNK
) -> Iterator[pa.Table]:
    """The rows of :func:`user_state_table`, ``users_per_chunk`` users at a time (the
    item strings of one chunk's lists exist at once, not those of all of train)."""
    if users_per_chunk < 1:
        raise ValueError(f"users_per_chunk must be >= 1, got {users_per_chunk}")
    train = data.split.train
    user_codes, user_names = id_codes(train[USER_ID])
    item_codes, item_names = id_codes(train[ITEM_ID])
    appearing, lengths, order = _user_runs(user_codes)
    if order is not None:
        item_codes = item_codes[order]
    item_strings = pa.array(item_names.astype(str), pa.large_string())
    ends = np.cumsum(lengths)
    known = np.asarray(user_names[appearing], dtype=object)
    large = len(item_codes) >= np.iinfo(np.int32).max  # past 32-bit list offsets
    extra = np.zeros(0, dtype=object)
    attributes = _UserAttributes(data.users, known) if data.users is not None else None
    if attributes is not None:
        extra = attributes.extra
    metadata = _pandas_metadata(attributes.rows(0, 1) if attributes is not None else None)
    length = data.encoders.history_length

    def chunk(lo: int, hi: int, with_events: bool) -> pa.Table:
        """Users ``lo..hi-1`` (of the known users, then of the extra ones)."""
        if with_events:
            first = int(ends[lo] - lengths[lo]) if hi > lo else 0
            last = int(ends[hi - 1]) if hi > lo else 0
            seen_values = pc.take(item_strings, pa.array(item_codes[first:last]))
            mine = lengths[lo:hi]
            local_ends = ends[lo:hi] - first
            starts = np.maximum(local_ends - length, local_ends - mine)
            history_values = pc.take(seen_values, pa.array(concatenated_ranges(starts, local_ends)))
            ids = known[lo:hi]
            history = _lists(history_values, local_ends - starts, large)
            seen = _lists(seen_values, mine, large)
            offset = 0
        else:  # users of the user table without events: empty lists
            empty_values = item_strings.slice(0, 0)
            empty = np.zeros(hi - lo, dtype=np.int64)
            ids = extra[lo:hi]
            history = _lists(empty_values, empty, large)
            seen = _lists(empty_values, empty, large)
            offset = len(known)
        table = pa.table(
            {
                USER_ID: pa.array(ids.astype(str), pa.string()),
                layout.HISTORY_COLUMN: history,
                layout.SEEN_COLUMN: seen,
            }
        )
        if attributes is not None:
            part = attributes.table(offset + lo, offset + hi)
            for name, column in zip(part.column_names, part.columns, strict=True):
                table = table.append_column(name, column)
        return table.replace_schema_metadata(metadata)

    yield chunk(0, min(users_per_chunk, len(known)), True)  # the first, even when empty
    for lo in range(users_per_chunk, len(known), users_per_chunk):
        yield chunk(lo, min(lo + users_per_chunk, len(known)), True)
    for lo in range(0, len(extra), users_per_chunk):
        yield chunk(lo, min(lo + users_per_chunk, len(extra)), False)


def user_state_table(data: PreparedData) -> pa.Table:
    """Each user of train (in order of first appearance) with their last
    ``history_length`` items and all their items in time order; then the users of the
    user table without events (empty lists); then the user table's attribute columns."""
    return pa.concat_tables(user_state_chunks(data)).combine_chunks()


def write_user_state(data: PreparedData, path: str, users_per_chunk: int = USERS_PER_CHUNK) -> int:
    """Write :func:`user_state_table` to the Parquet file ``path``, ``users_per_chunk``
    users at a time; return the number of users written."""
    import pyarrow.parquet as pq

    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        for table in user_state_chunks(data, users_per_chunk):
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            rows += table.num_rows
            del table
            pa.default_memory_pool().release_unused()  # the chunk's lists, given back
    finally:
        if writer is not None:
            writer.close()
    return rows
