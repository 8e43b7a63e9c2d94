"""A prepared directory's ``split/`` read into a :class:`~towers.data.split.Split` one
file at a time, as integer codes.

``split/`` holds every event (a hundred million at the scale ladder's top rung) with its
part. Reading it whole and cutting the four parts from it held the table of every event
beside the parts. Here each file is read, its ids are turned into codes and its rows are
appended to the part they belong to, so what is held is the parts' codes and one file:

- items become positions among the catalogue's ids at once (every event's item is in
  the catalogue, or the evaluation sets could not be built);
- users become positions in the files' own id dictionaries (each file's users are a
  narrow range: the events are in user order), which are sorted into one vocabulary
  once every file is read.

The parts carry ``user_id`` and ``item_id`` as Categoricals of the sorted string ids
present in ``split/``, exactly as :func:`towers.data.ids.encode_id_column` encodes the
table of every event, and no ``timestamp`` or ``weight``: what follows a prepared
directory's split (the evaluation sets, the bundle's counts and user histories) reads the
events' order, never their times or weights. Each file holds a contiguous range of
``event`` (as both writers write them); the files are read in the order of their first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from towers.data.ids import as_id_strings
from towers.data.schema import ITEM_ID, USER_ID
from towers.data.split import Split
from twotower.errors import PreparedDataError
from twotower.spark import shards

PARTS = ("fit", "validation", "test")  # the values of split/'s part column
TRAIN = "train"  # fit and validation, in event order


def split_files(directory: Path, where: str = "") -> list[Path]:
    """The Parquet files of ``directory`` (names starting with ``_`` or ``.`` are not data)
    in the order of their first event."""
    files = [
        path
        for path in directory.rglob("*")
        if path.is_file() and not path.name.startswith(("_", ".")) and not _hidden(path, directory)
    ]
    if not files:
        raise PreparedDataError(f"{where}: {shards.SPLIT}/ has no data files")
    return sorted(files, key=lambda path: (_first_event(path, where), str(path)))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(("_", ".")) for part in path.relative_to(root).parts[:-1])


def _first_event(path: Path, where: str) -> int:
    """The smallest ``event`` of a file, from its row-group statistics when it has them."""
    try:
        metadata = pq.ParquetFile(path).metadata
        column = metadata.schema.names.index(shards.EVENT)
        lowest = None
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max:
                lowest = None
                break
            lowest = stats.min if lowest is None else min(lowest, stats.min)
        if lowest is None and metadata.num_rows:
            events = pq.read_table(path, columns=[shards.EVENT]).column(0)
            lowest = pc.min(events).as_py()
    except (OSError, pa.ArrowException) as exc:  # before ValueError: ArrowInvalid is one
        raise PreparedDataError(f"{where}: cannot read {path} ({exc})") from exc
    except ValueError as exc:  # no event column
        raise PreparedDataError(f"{where}: {path}: no column '{shards.EVENT}'") from exc
    return int(lowest) if lowest is not None else np.iinfo(np.int64).max


@dataclass
class _PartRows:
    """One part's rows so far: user codes (positions in the files' user dictionaries
    laid end to end) and item codes (positions among the sorted catalogue ids)."""

    users: list[np.ndarray] = field(default_factory=list)
    items: list[np.ndarray] = field(default_factory=list)


class SplitReader:
    """Reads ``split/`` file by file (see the module doc); :meth:`read` gives the
    :class:`Split`."""

    def __init__(self, directory: Path, catalogue_ids: np.ndarray, where: str = "") -> None:
        self.directory = directory
        self.where = where
        self.source = f"{where}/{shards.SPLIT}"
        self.item_ids = np.sort(as_id_strings(catalogue_ids))
        self._item_index = pd.Index(self.item_ids, dtype=object)
        self._parts = {name: _PartRows() for name in (TRAIN, *PARTS)}
        self._user_dictionaries: list[np.ndarray] = []
        self._user_offset = 0
        self._next_event = 0

    def read(self, cold_items: list[str]) -> Split:
        """The :class:`Split` of every file (train: fit and validation in event order)."""
        for path in split_files(self.directory, self.where):
            self._read_file(path)
        return self._split(np.asarray(cold_items, dtype=object))

    def _read_file(self, path: Path) -> None:
        columns = [shards.EVENT, USER_ID, ITEM_ID, shards.PART]
        try:
            table = pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise PreparedDataError(f"{self.where}: cannot read {path} ({exc})") from exc
        if not table.num_rows:
            return
        event = table.column(shards.EVENT).to_numpy()
        if (np.diff(event) < 0).any():  # rows out of order within the file
            order = np.argsort(event, kind="stable")
            table, event = table.take(pa.array(order)), event[order]
        expected = np.arange(self._next_event, self._next_event + len(event))
        if not np.array_equal(event, expected):
            raise PreparedDataError(
                f"{self.where}: {shards.SPLIT}/ event is not 0..n-1 ({path.name} starts at "
                f"event {int(event[0])}, the next expected is {self._next_event})"
            )
        self._next_event += len(event)
        users = self._user_codes(table.column(USER_ID), path)
        items = self._item_codes(table.column(ITEM_ID), path)
        part = self._part_names(table.column(shards.PART), path)
        test = PARTS.index("test")
        for name, rows in ((TRAIN, part != test), *((n, part == c) for c, n in enumerate(PARTS))):
            if rows.any():
                self._parts[name].users.append(users[rows])
                self._parts[name].items.append(items[rows])

    def _dictionary(
        self, column: pa.ChunkedArray, path: Path, name: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Codes (int64) and distinct values of a string column; a missing value names the
        file and row."""
        array = column.combine_chunks()
        if pa.types.is_dictionary(array.type):  # e.g. written from a pandas Categorical
            array = array.cast(array.type.value_type)
        encoded = pc.dictionary_encode(array)
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        if encoded.null_count:
            row = int(np.flatnonzero(pd.isna(codes))[0]) if codes.dtype.kind == "f" else 0
            raise PreparedDataError(
                f"{self.source}/{path.name}: column '{name}' has a missing value at row {row}"
            )
        return np.asarray(codes, dtype=np.int64), encoded.dictionary.to_numpy(zero_copy_only=False)

    def _user_codes(self, column: pa.ChunkedArray, path: Path) -> np.ndarray:
        codes, values = self._dictionary(column, path, USER_ID)
        self._user_dictionaries.append(as_id_strings(values))  # float ids lose their .0
        codes += self._user_offset
        self._user_offset += len(values)
        return codes.astype(np.int32) if self._user_offset < 2**31 else codes

    def _item_codes(self, column: pa.ChunkedArray, path: Path) -> np.ndarray:
        codes, values = self._dictionary(column, path, ITEM_ID)
        positions = self._item_index.get_indexer(as_id_strings(values))
        if (positions < 0).any():
            unknown = [str(v) for v in np.asarray(values, dtype=object)[positions < 0][:5]]
            raise PreparedDataError(
                f"{self.source}/{path.name}: item_id {unknown} not in {shards.CATALOGUE}/"
            )
        return positions.astype(np.int32)[codes]

    def _part_names(self, column: pa.ChunkedArray, path: Path) -> np.ndarray:
        codes, values = self._dictionary(column, path, shards.PART)
        known = {name: code for code, name in enumerate(PARTS)}
        unknown = sorted(str(v) for v in values if v not in known)
        if unknown:
            raise PreparedDataError(f"{self.where}: {shards.SPLIT}/ has unknown parts {unknown}")
        return np.asarray([known[v] for v in values], dtype=np.int8)[codes]

    def _split(self, cold_items: np.ndarray) -> Split:
        user_values = (
            np.concatenate(self._user_dictionaries)
            if self._user_dictionaries
            else np.zeros(0, dtype=object)
        )
        self._user_dictionaries = []
        user_ids, user_of_entry = np.unique(user_values, return_inverse=True)
        del user_values
        small = np.int32 if max(len(user_ids), len(self.item_ids)) < 2**31 else np.int64
        user_of_entry = user_of_entry.astype(small)
        present = np.zeros(len(self.item_ids), dtype=bool)
        for name in PARTS:  # train's rows are fit's and validation's
            for items in self._parts[name].items:
                present[items] = True
        item_code = (np.cumsum(present) - 1).astype(small)
        user_type = pd.CategoricalDtype(pd.Index(user_ids, dtype=object))
        item_type = pd.CategoricalDtype(pd.Index(self.item_ids[present], dtype=object))

        def frame(users: list[np.ndarray], items: list[np.ndarray]) -> pd.DataFrame:
            user_codes = user_of_entry[np.concatenate(users)] if users else np.zeros(0, small)
            item_codes = item_code[np.concatenate(items)] if items else np.zeros(0, small)
            return pd.DataFrame(
                {
                    USER_ID: pd.Categorical.from_codes(user_codes, dtype=user_type),
                    ITEM_ID: pd.Categorical.from_codes(item_codes, dtype=item_type),
                },
                copy=False,  # a DataFrame made from a dict copies its columns by default
            )

        parts = {}
        for name in list(self._parts):  # each part's pieces let go once it is built
            rows = self._parts.pop(name)
            parts[name] = frame(rows.users, rows.items)
        return Split(**parts, cold_items=cold_items)
