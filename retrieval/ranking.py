"""Ranking over one catalogue snapshot: what a user must not get (seen items, history,
exclusions), what may be returned (filters, removed items), the user tower, candidate
search with the freshness boost, and the popularity fallback. :class:`Ranker` holds no
catalogue; :class:`~retrieval.retriever.Retriever` passes it the current snapshot."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from retrieval.catalogue import Catalogue
from retrieval.filters import Filter, MaskCache
from retrieval.requests import HISTORY, MODEL, POPULARITY, Recommendations
from retrieval.search import BannedRows, TopK, merge_top_k, most_popular, top_k, top_k_one
from retrieval.users import UserEncoder, UserFeatures

log = logging.getLogger(__name__)
NOTHING = np.zeros(0, dtype=np.int64)


class Ranker:
    """Answers the queries of a :class:`~retrieval.retriever.Retriever` over a snapshot."""

    def __init__(
        self, users: UserEncoder, default_knobs: Mapping[str, Any], separator: str = "|"
    ) -> None:
        self.users = users
        self.default_knobs = dict(default_knobs)
        self.separator = separator
        self.masks = MaskCache()

    def knobs(self, catalogue: Catalogue, search_params: Mapping[str, Any] | None) -> dict:
        """The bundle's default search knobs overridden by the request's, checked."""
        knobs = {**self.default_knobs, **search_params} if search_params else self.default_knobs
        catalogue.index.check_knobs(knobs)
        return knobs

    def allowed(self, catalogue: Catalogue, filter: Filter | None) -> np.ndarray:
        """Rows that may be returned: visible and matching ``filter`` (masks cached)."""
        return self.masks.allowed(
            catalogue.version, catalogue.items, catalogue.visible, filter, self.separator
        )

    @staticmethod
    def banned(catalogue: Catalogue, ids: Sequence[Any]) -> np.ndarray:
        """Sorted unique rows of ``ids`` (unknown ids ignored)."""
        if not ids:
            return NOTHING
        rows = catalogue.rows_of(ids)
        return np.unique(rows[rows >= 0])

    def banned_for(
        self,
        catalogue: Catalogue,
        position: int,
        history: Sequence[Any] | None,
        common: np.ndarray,
        exclude_seen: bool,
    ) -> np.ndarray:
        """Sorted unique rows one user must not get: seen items (rows looked up at load,
        followed through upserts), the given history, and ``common``."""
        seen = self.users.seen_rows(position) if exclude_seen else NOTHING
        if catalogue.remap is not None and len(seen):
            seen = np.unique(catalogue.current(seen))
        if not history and not len(common):
            return seen
        parts = [seen, common, self.banned(catalogue, [str(i) for i in history or ()])]
        return np.unique(np.concatenate(parts))

    def one(
        self,
        catalogue: Catalogue,
        user_id: Any,
        history: Sequence[Any] | None,
        user_features: UserFeatures | None,
        k: int,
        exclude_seen: bool,
        exclude: Sequence[Any] | None,
        filter: Filter | None,
        search_params: Mapping[str, Any] | None,
        boost: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One user's top-``k`` (1-D ids and scores); arguments already checked."""
        position = self.users.position.get(str(user_id)) if user_id is not None else None
        if (
            position is not None
            and not history
            and not user_features
            and exclude is None
            and filter is None
            and search_params is None
            and not boost
            and not catalogue.small_after_hiding
        ):
            return self.known_one(catalogue, position, k, exclude_seen)
        knobs = self.knobs(catalogue, search_params)
        positions = self.users.positions([user_id])
        common = self.banned(catalogue, [str(i) for i in (exclude or [])])
        banned = self.banned_for(catalogue, positions[0], history, common, exclude_seen)
        allowed = self.allowed(catalogue, filter)
        if positions[0] == self.users.missing_row and not user_features and not history:
            rows, scores = most_popular(catalogue.popularity, banned, allowed, k)
            return catalogue.item_ids[rows], scores
        query = self.users.encode([user_id], [history], [user_features], positions)
        rows_2d, scores_2d = self.search(catalogue, query, [banned], allowed, k, knobs, boost)
        keep = rows_2d[0] >= 0
        return catalogue.item_ids[rows_2d[0][keep]], scores_2d[0][keep]

    def known_one(
        self, catalogue: Catalogue, position: int, k: int, exclude_seen: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """``recommend`` for a known user with nothing but the stored state (the common
        call), in as few steps as possible; the same answer as the general path."""
        users = self.users
        query = users.run(users.stored_row(position))
        banned = users.seen_rows(position) if exclude_seen else NOTHING
        if catalogue.remap is not None and len(banned):
            banned = np.unique(catalogue.current(banned))
        rows, scores = top_k_one(
            catalogue.index,
            query,
            banned,
            catalogue.visible,
            catalogue.live,
            k,
            self.default_knobs,
        )
        return catalogue.item_ids[rows], scores

    def many(
        self,
        catalogue: Catalogue,
        ids: list[Any],
        hists: list[Any],
        feats: list[Any],
        k: int,
        exclude_seen: bool,
        exclude: Sequence[Any] | None,
        filter: Filter | None,
        search_params: Mapping[str, Any] | None,
        boost: float,
    ) -> Recommendations:
        """Many users' top-``k`` with what served each; arguments already checked."""
        knobs = self.knobs(catalogue, search_params)  # validated before any work
        positions = self.users.positions(ids)
        if (
            exclude is None
            and filter is None
            and not boost
            and catalogue.remap is None
            and not catalogue.small_after_hiding
            and not any(hists)
            and not any(feats)
            and bool((positions != self.users.missing_row).all())
        ):
            return self.known_many(catalogue, positions, k, knobs, exclude_seen)
        common = self.banned(catalogue, [str(i) for i in (exclude or [])])
        banned = [
            self.banned_for(catalogue, positions[r], hists[r], common, exclude_seen)
            for r in range(len(ids))
        ]
        allowed = self.allowed(catalogue, filter)
        served_by = [
            MODEL
            if positions[r] != self.users.missing_row or feats[r]
            else HISTORY
            if hists[r]
            else POPULARITY
            for r in range(len(ids))
        ]
        out_rows = np.full((len(ids), k), -1, dtype=np.int64)
        out_scores = np.full((len(ids), k), np.nan, dtype=np.float32)
        warm = [r for r in range(len(ids)) if served_by[r] != POPULARITY]
        if warm:
            queries = self.users.encode(
                [ids[r] for r in warm],
                [hists[r] for r in warm],
                [feats[r] for r in warm],
                positions[warm],
            )
            rows, scores = self.search(
                catalogue, queries, [banned[r] for r in warm], allowed, k, knobs, boost
            )
            out_rows[warm], out_scores[warm] = rows, scores
        for r in (r for r in range(len(ids)) if served_by[r] == POPULARITY):
            rows, scores = most_popular(catalogue.popularity, banned[r], allowed, k)
            out_rows[r, : len(rows)], out_scores[r, : len(rows)] = rows, scores
        out_ids = np.full(out_rows.shape, None, dtype=object)
        valid = out_rows >= 0
        out_ids[valid] = catalogue.item_ids[out_rows[valid]]
        return Recommendations(out_ids, out_scores, served_by)

    def known_many(
        self,
        catalogue: Catalogue,
        positions: np.ndarray,
        k: int,
        knobs: Mapping[str, Any],
        exclude_seen: bool,
    ) -> Recommendations:
        """``retrieve`` for known users with nothing but their stored state (the common
        batch), vectorised; the same answer as the general path."""
        users = self.users
        inputs = {name: values[positions] for name, values in users.stored_inputs.items()}
        inputs["history"] = users.stored_histories[positions]
        queries = users.run(inputs)
        if exclude_seen:
            starts = users.seen_offsets[positions]
            lengths = users.seen_offsets[positions + 1] - starts
            shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
            rows = users.seen_flat[shift + np.arange(int(lengths.sum()))]
            banned = BannedRows(lengths, rows)
        else:
            banned = BannedRows(np.zeros(len(positions), np.int64), NOTHING)
        out_rows, out_scores = top_k(
            catalogue.index,
            catalogue.vectors,
            queries,
            banned,
            catalogue.visible,
            k,
            knobs,
            catalogue.live,
        )
        out_ids = np.full(out_rows.shape, None, dtype=object)
        valid = out_rows >= 0
        out_ids[valid] = catalogue.item_ids[out_rows[valid]]
        return Recommendations(out_ids, out_scores, [MODEL] * len(positions))

    @staticmethod
    def search(
        catalogue: Catalogue,
        queries: np.ndarray,
        banned: list[np.ndarray],
        allowed: np.ndarray,
        k: int,
        knobs: Mapping[str, Any],
        boost: float,
    ) -> TopK:
        """Model search; with a boost, seen and new items are searched apart, the new
        ones' scores lifted, and the two lists merged."""
        new = allowed & (catalogue.popularity == 0) if boost else None
        if new is None or not new.any():
            count = catalogue.live if allowed is catalogue.visible else None
            return top_k(
                catalogue.index, catalogue.vectors, queries, banned, allowed, k, knobs, count
            )
        index, vectors = catalogue.index, catalogue.vectors
        seen_top = top_k(index, vectors, queries, banned, allowed & ~new, k, knobs)
        new_rows, new_scores = top_k(index, vectors, queries, banned, new, k, knobs)
        return merge_top_k(seen_top, (new_rows, new_scores + boost), k)

    def similar(
        self,
        catalogue: Catalogue,
        item_id: Any,
        k: int,
        filter: Filter | None,
        search_params: Mapping[str, Any] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The items closest to ``item_id``; popular items for an unknown id."""
        knobs = self.knobs(catalogue, search_params)
        row = catalogue.rows_of([item_id])[0]
        allowed = self.allowed(catalogue, filter)
        banned = np.array([row], dtype=np.int64) if row >= 0 else np.zeros(0, np.int64)
        if row < 0:
            log.info("similar_items: unknown item %r; returning popular items", item_id)
            rows, scores = most_popular(catalogue.popularity, banned, allowed, k)
        else:
            rows_2d, scores_2d = top_k(
                catalogue.index,
                catalogue.vectors,
                catalogue.vectors[row : row + 1],
                [banned],
                allowed,
                k,
                knobs,
            )
            keep = rows_2d[0] >= 0
            rows, scores = rows_2d[0][keep], scores_2d[0][keep]
        return catalogue.item_ids[rows], scores
