"""The catalogue snapshot: ids, vectors, attributes and the searchable index, immutable.

Every edit (add, upsert, remove) returns a new :class:`Catalogue` and leaves the old one
as it was (copy-on-write), so a query that holds a snapshot sees the catalogue wholly
before or wholly after a change, never half of one.

An upsert (adding an id the catalogue already has) appends the new row and marks the
old one superseded: hidden from every result and no longer found by id. Superseded
rows are dropped when the catalogue is saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from retrieval.search import EXACT_SUBSET_MAX, CandidateIndex
from twotower.bundle import layout


@dataclass(frozen=True)
class Catalogue:
    """One consistent view of the catalogue. Row ``r`` of every array is one item."""

    index: CandidateIndex
    item_ids: np.ndarray
    vectors: np.ndarray
    items: pd.DataFrame
    popularity: np.ndarray
    removed: np.ndarray
    superseded: np.ndarray
    lookup: dict[str, int]
    version: int = 0
    # the current row of each row's item (rows move on upsert); None while none has moved
    remap: np.ndarray | None = None
    visible: np.ndarray = field(init=False, repr=False, compare=False)
    live: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        visible = ~(self.removed | self.superseded)
        object.__setattr__(self, "visible", visible)  # computed once per snapshot
        object.__setattr__(self, "live", int(visible.sum()))

    @classmethod
    def from_bundle(
        cls, index: CandidateIndex, items: pd.DataFrame, vectors: np.ndarray
    ) -> Catalogue:
        """The catalogue of a loaded bundle (``items.parquet`` rows in index order)."""
        ids = items[layout.ITEM_ID].astype(str).to_numpy(dtype=object)
        removed = (
            items[layout.REMOVED_COLUMN].to_numpy(dtype=bool)
            if layout.REMOVED_COLUMN in items
            else np.zeros(len(items), bool)
        )
        return cls(
            index=index,
            item_ids=ids,
            vectors=vectors,
            items=items,
            popularity=items[layout.COUNT_COLUMN].to_numpy(dtype=np.float32),
            removed=removed,
            superseded=np.zeros(len(ids), bool),
            lookup={item: row for row, item in enumerate(ids)},
        )

    @property
    def size(self) -> int:
        """Rows in the index (removed and superseded rows included)."""
        return len(self.item_ids)

    @property
    def small_after_hiding(self) -> bool:
        """So few items left visible that searches score them exactly (see
        :func:`retrieval.search.top_k`)."""
        return self.live <= EXACT_SUBSET_MAX and self.live < self.size

    def current(self, rows: np.ndarray) -> np.ndarray:
        """Where the items at ``rows`` are now (an upserted item has a new row)."""
        return rows if self.remap is None else self.remap[rows]

    def rows_of(self, item_ids: Sequence[Any]) -> np.ndarray:
        """Current row of each id (-1 when unknown)."""
        lookup = self.lookup
        return np.fromiter((lookup.get(str(i), -1) for i in item_ids), np.int64, len(item_ids))

    def with_items(self, table: pd.DataFrame, vectors: np.ndarray) -> Catalogue:
        """A snapshot with ``table``'s rows (unique string ``item_id``) appended; ids
        already present are upserted (their old rows superseded), removed ids come back."""
        n_new = len(table)
        new_ids = table[layout.ITEM_ID].to_numpy(dtype=object)
        previous = self.rows_of(list(new_ids))
        superseded = np.concatenate([self.superseded, np.zeros(n_new, bool)])
        moved = np.flatnonzero(previous >= 0)
        superseded[previous[moved]] = True
        remap = self.remap
        if len(moved) or remap is not None:
            base = np.arange(self.size) if remap is None else remap
            remap = np.concatenate([base, np.arange(self.size, self.size + n_new)])
            if len(moved):
                target = np.full(self.size + n_new, -1, np.int64)
                target[previous[moved]] = self.size + moved
                hit = target[remap] >= 0
                remap[hit] = target[remap[hit]]
        new_rows = table.assign(**{layout.COUNT_COLUMN: 0, layout.REMOVED_COLUMN: False})
        lookup = dict(self.lookup)
        lookup.update({item: self.size + j for j, item in enumerate(new_ids)})
        return Catalogue(
            index=self.index.with_vectors(vectors),
            item_ids=np.concatenate([self.item_ids, new_ids]),
            vectors=np.concatenate([self.vectors, vectors.astype(np.float32)]),
            items=pd.concat([self.items, new_rows], ignore_index=True),
            popularity=np.concatenate([self.popularity, np.zeros(n_new, np.float32)]),
            removed=np.concatenate([self.removed, np.zeros(n_new, bool)]),
            superseded=superseded,
            lookup=lookup,
            version=self.version + 1,
            remap=remap,
        )

    def without_items(self, item_ids: Sequence[Any]) -> tuple[Catalogue, int]:
        """A snapshot with these ids hidden (unknown ids ignored), and how many were newly
        hidden."""
        rows = self.rows_of(list(item_ids))
        rows = rows[rows >= 0]
        removed = self.removed.copy()
        newly = int((~removed[rows]).sum())
        removed[rows] = True
        items = self.items.copy()
        items[layout.REMOVED_COLUMN] = removed
        return replace(self, removed=removed, items=items, version=self.version + 1), newly

    def current_rows(self) -> np.ndarray:
        """Rows that are not superseded (what a saved bundle keeps), in order."""
        return np.flatnonzero(~self.superseded)
