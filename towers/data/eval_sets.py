"""Evaluation sets: the users to score, their tower inputs, what to exclude and what to
find, built for a range of users at a time, so that evaluation streams its users.

An :class:`EvalSource` keeps, per user, where their known and held-out events lie in the
split's tables (which are sorted by user); :meth:`EvalSource.materialise` builds the
:class:`EvalSet` of users ``lo..hi-1`` from them. Evaluating in pieces
(:func:`towers.evaluation.ranking.evaluate_stream`) holds one piece's inputs at a time,
whatever the number of users; the whole set is ``materialise()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from towers.data.ids import distinct_in_order, id_codes, positions_in
from towers.data.samples import concatenated_ranges, history_windows, runs
from towers.data.schema import ITEM_ID, USER_ID
from twotower.encoding import FeatureEncoders
from twotower.encoding.vocabulary import code_counts
from twotower.errors import UnknownIdError


@dataclass
class EvalSet:
    """Users to score, their tower inputs, what to exclude and what to find (catalogue rows).

    ``unavailable_items``: catalogue rows that are no one's candidate in this evaluation
    (in the cold-item split, validation does not rank the test's held-out items: they
    belong to the test's future, as the validation items belong to validation's)."""

    user_ids: np.ndarray
    user_inputs: dict[str, np.ndarray]
    exclude_users: np.ndarray
    exclude_items: np.ndarray
    target_users: np.ndarray
    target_items: np.ndarray
    popularity: np.ndarray
    unavailable_items: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


def catalogue_rows(catalogue: pd.DataFrame, item_ids: pd.Series | np.ndarray) -> np.ndarray:
    """Row of each item id in the catalogue; an id missing from it is an error."""
    rows = positions_in(pd.Index(catalogue[ITEM_ID], dtype=object), item_ids)
    if (rows < 0).any():
        missing = np.asarray(pd.Series(item_ids)[rows < 0].iloc[:5], dtype=object)
        raise UnknownIdError(f"item_id {missing.tolist()} not in the item table")
    return rows


def user_attribute_rows(users: pd.DataFrame | None, user_ids: np.ndarray) -> pd.DataFrame | None:
    """Rows of the user table aligned with ``user_ids`` (all-missing for unknown users)."""
    if users is None:
        return None
    return (
        users.set_index(USER_ID)
        .reindex(pd.Index(user_ids, dtype=object, name=USER_ID))
        .reset_index()
    )


def encode_users(
    encoders: FeatureEncoders,
    users: pd.DataFrame | None,
    user_ids: np.ndarray,
    histories: np.ndarray,
) -> dict[str, np.ndarray]:
    """User-tower inputs for ``user_ids`` with their encoded ``histories``."""
    return encoders.user_inputs(list(user_ids), histories, user_attribute_rows(users, user_ids))


class EvalSource:
    """What builds the evaluation set of any range of the users of ``held_out``, scored
    from their ``known`` events (history and exclusions); ``unavailable_items`` (item
    ids) are ranked for no one. Users are in order of first appearance in ``held_out``.

    It keeps references to ``known`` and ``held_out`` (a split's parts, normally sorted by
    user) and per-user row ranges in them: a few integers per user and per held-out row.
    """

    def __init__(
        self,
        known: pd.DataFrame,
        held_out: pd.DataFrame,
        catalogue: pd.DataFrame,
        users: pd.DataFrame | None,
        encoders: FeatureEncoders,
        unavailable_items: np.ndarray | None = None,
    ) -> None:
        self.users = users
        self.encoders = encoders
        self.n_items = len(catalogue)
        self.user_ids = distinct_in_order(held_out[USER_ID])
        position = pd.Index(self.user_ids, dtype=object)
        catalogue_index = pd.Index(catalogue[ITEM_ID], dtype=object)

        held_positions = positions_in(position, held_out[USER_ID])
        held_items = catalogue_rows(catalogue, held_out[ITEM_ID])
        if len(held_positions) > 1 and (np.diff(held_positions) < 0).any():
            order = np.argsort(held_positions, kind="stable")
            held_positions, held_items = held_positions[order], held_items[order]
        self._held_positions = held_positions
        self._held_items = held_items
        self._held_bounds = np.searchsorted(held_positions, np.arange(self.n_users + 1))

        # known events: the item of each row as a code, with per-code catalogue rows and
        # encoder indices, and each scored user's rows as a range
        item_codes, item_ids = id_codes(known[ITEM_ID])
        counts = code_counts(item_codes, len(item_ids))
        self._item_catalogue_rows = catalogue_index.get_indexer(item_ids).astype(np.int64)
        unknown = (counts > 0) & (self._item_catalogue_rows < 0)
        if unknown.any():
            raise UnknownIdError(f"item_id {item_ids[unknown][:5].tolist()} not in the item table")
        self._item_encoded = encoders.items.ids.encode(pd.Series(item_ids, dtype=object))
        self._known_item_codes = item_codes
        popularity = np.zeros(self.n_items, dtype=np.int64)
        present = counts > 0
        np.add.at(popularity, self._item_catalogue_rows[present], counts[present])
        self.popularity = popularity.astype(np.float64)
        self.unavailable_items = catalogue_rows(
            catalogue, np.asarray([] if unavailable_items is None else unavailable_items)
        )

        user_codes, user_names = id_codes(known[USER_ID])
        first, end = runs(user_codes)
        self._known_order: np.ndarray | None = None
        if len(first) != len(np.unique(user_codes[first])):  # a user's rows not together
            self._known_order = np.argsort(user_codes, kind="stable")
            first, end = runs(user_codes[self._known_order])
            run_users = user_codes[self._known_order[first]]
        else:
            run_users = user_codes[first]
        run_positions = position.get_indexer(user_names[run_users])
        scored = run_positions >= 0
        self._known_start = np.zeros(self.n_users, dtype=np.int64)
        self._known_end = np.zeros(self.n_users, dtype=np.int64)
        self._known_start[run_positions[scored]] = first[scored]
        self._known_end[run_positions[scored]] = end[scored]
        # each scored user's row of the user table (-1: none), so that a piece's attributes
        # are looked up among its own users' rows, not by indexing the whole table again
        self._user_table_rows: np.ndarray | None = None
        if users is not None:
            table_ids = pd.Index(users[USER_ID], dtype=object)
            self._user_table_rows = positions_in(table_ids, self.user_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def materialise(self, lo: int = 0, hi: int | None = None) -> EvalSet:
        """The :class:`EvalSet` of users ``lo..hi-1`` (all by default), user positions
        counted from ``lo``."""
        hi = self.n_users if hi is None else min(hi, self.n_users)
        lo = max(0, min(lo, hi))
        starts, ends = self._known_start[lo:hi], self._known_end[lo:hi]
        lengths = ends - starts
        rows = concatenated_ranges(starts, ends)
        if self._known_order is not None:
            rows = self._known_order[rows]
        codes = self._known_item_codes[rows]
        local_ends = np.cumsum(lengths)
        encoded = self._item_encoded[codes] if len(codes) else np.zeros(1, dtype=np.int64)
        histories = history_windows(
            encoded,
            local_ends - lengths,
            local_ends,
            self.encoders.history_length,
        )
        user_ids = self.user_ids[lo:hi]
        users = self.users
        if users is not None and self._user_table_rows is not None:
            table_rows = self._user_table_rows[lo:hi]
            users = users.iloc[table_rows[table_rows >= 0]]
        a, b = self._held_bounds[lo], self._held_bounds[hi]
        return EvalSet(
            user_ids=user_ids,
            user_inputs=encode_users(self.encoders, users, user_ids, histories),
            exclude_users=np.repeat(np.arange(hi - lo, dtype=np.int64), lengths),
            exclude_items=self._item_catalogue_rows[codes],
            target_users=self._held_positions[a:b] - lo,
            target_items=self._held_items[a:b],
            popularity=self.popularity,
            unavailable_items=self.unavailable_items,
        )


def build_eval_set(
    known: pd.DataFrame,
    held_out: pd.DataFrame,
    catalogue: pd.DataFrame,
    users: pd.DataFrame | None,
    encoders: FeatureEncoders,
    unavailable_items: np.ndarray | None = None,
) -> EvalSet:
    """The whole evaluation set of :class:`EvalSource` (all users at once)."""
    return EvalSource(known, held_out, catalogue, users, encoders, unavailable_items).materialise()
