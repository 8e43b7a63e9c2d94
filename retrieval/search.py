"""Candidate search: the top-k rows of a catalogue for query vectors, with exclusions,
filters and per-request knobs.

A :class:`CandidateIndex` answers plain top-k searches; two versions exist,
:class:`FaissCandidates` (any FAISS index, on the CPU or a GPU) and
:class:`ExactCandidates` (a numpy matrix product, for small subsets). :func:`top_k`
composes them with the ``allowed`` mask (filters, removed items) and the per-user
``banned`` rows (seen items, exclusions): the index is over-fetched by what will be
dropped and re-searched wider for users still short, and a filter leaving few items is
scored exactly instead. Copy-on-write: ``with_vectors`` returns a new index.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import faiss
import numpy as np

from retrieval.index import index_kind, search_parameters

log = logging.getLogger(__name__)
EXACT_SUBSET_MAX = 4096
Rows = np.ndarray
TopK = tuple[np.ndarray, np.ndarray]  # (rows int64 (n, k) padded -1, scores float32 padded NaN)


class CandidateIndex(Protocol):
    """What :func:`top_k` needs of an index over the catalogue's vectors."""

    @property
    def size(self) -> int: ...

    @property
    def prefix_consistent(self) -> bool: ...

    def check_knobs(self, knobs: Mapping[str, Any]) -> None: ...

    def search(
        self, queries: np.ndarray, k: int, knobs: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def with_vectors(self, vectors: np.ndarray) -> CandidateIndex: ...


class FaissCandidates:
    """A FAISS index (any factory string), searched with per-call knobs; on the GPU when
    ``gpu`` and faiss has GPU support (the CPU copy is kept for edits and saving)."""

    def __init__(self, index: faiss.Index, gpu: bool = False) -> None:
        self.cpu_index = index
        self.gpu = gpu and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
        self.index = faiss.index_cpu_to_all_gpus(index) if self.gpu else index
        self.ntotal = int(index.ntotal)
        kind = index_kind(index)
        self._prefix_consistent = not kind["hnsw"] and not kind["refine"]
        # SearchParameters per knob setting, built once (building them costs more than a
        # small search); bounded, since knobs come from requests
        self._parameters: dict[tuple, Any] = {}
        self._no_knobs = self.parameters({})

    @property
    def size(self) -> int:
        return self.ntotal

    @property
    def prefix_consistent(self) -> bool:
        """Whether a search for more neighbours returns the same first ones (true for exact
        and IVF indexes; HNSW and re-ranking indexes depend on the number asked for)."""
        return self._prefix_consistent

    def parameters(self, knobs: Mapping[str, Any]) -> Any:
        """The (cached) ``faiss.SearchParameters`` for ``knobs``; raises
        :class:`~twotower.errors.RequestError` for knobs this index does not take."""
        key = tuple(sorted(knobs.items()))
        params = self._parameters.get(key, self)
        if params is self:
            params = search_parameters(self.cpu_index, knobs)
            if len(self._parameters) < 256:
                self._parameters[key] = params
        return params

    def check_knobs(self, knobs: Mapping[str, Any]) -> None:
        """Raise :class:`~twotower.errors.RequestError` for knobs this index does not take."""
        self.parameters(knobs)

    def search(
        self, queries: np.ndarray, k: int, knobs: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        params = self.parameters(knobs) if knobs else self._no_knobs
        k = max(1, min(int(k), self.ntotal))
        if queries.dtype != np.float32 or not queries.flags.c_contiguous:
            queries = np.ascontiguousarray(queries, dtype=np.float32)
        if params is None:
            return self.index.search(queries, k)
        return self.index.search(queries, k, params=params)

    def with_vectors(self, vectors: np.ndarray) -> FaissCandidates:
        """A copy with ``vectors`` appended (the original is left as it is)."""
        index = faiss.clone_index(self.cpu_index)
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return FaissCandidates(index, self.gpu)


class ExactCandidates:
    """Exact inner-product search over a vector matrix (numpy); takes no knobs."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    @property
    def size(self) -> int:
        return len(self.vectors)

    @property
    def prefix_consistent(self) -> bool:
        return True

    def check_knobs(self, knobs: Mapping[str, Any]) -> None:
        if knobs:
            from twotower.errors import RequestError

            raise RequestError(f"exact search takes no search knobs, got {sorted(knobs)}")

    def search(
        self, queries: np.ndarray, k: int, knobs: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ self.vectors.T
        take = max(1, min(k, self.size))
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        return np.take_along_axis(part_scores, order, axis=1), np.take_along_axis(
            part, order, axis=1
        )

    def with_vectors(self, vectors: np.ndarray) -> ExactCandidates:
        return ExactCandidates(np.concatenate([self.vectors, vectors]))


@dataclass(frozen=True)
class BannedRows:
    """Every user's banned rows concatenated (sorted and unique within each user), with
    how many each user has: the batch form of a list of per-user row arrays."""

    lengths: np.ndarray
    rows: np.ndarray

    @classmethod
    def of(cls, banned: Sequence[Rows] | BannedRows) -> BannedRows:
        if isinstance(banned, BannedRows):
            return banned
        lengths = np.fromiter((len(b) for b in banned), np.int64, len(banned))
        rows = np.concatenate(banned) if lengths.any() else np.zeros(0, np.int64)
        return cls(lengths, rows.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return len(self.lengths)

    def per_user(self) -> list[Rows]:
        return np.split(self.rows, np.cumsum(self.lengths)[:-1])


def empty_top_k(n_users: int, k: int) -> TopK:
    return (
        np.full((n_users, k), -1, dtype=np.int64),
        np.full((n_users, k), np.nan, dtype=np.float32),
    )


def _exact_subset(
    vectors: np.ndarray, queries: np.ndarray, banned: Sequence[Rows], allowed: np.ndarray, k: int
) -> TopK:
    """Score the allowed rows exactly (a filter left few of them)."""
    n_users = len(queries)
    out_rows, out_scores = empty_top_k(n_users, k)
    candidates = np.flatnonzero(allowed)
    scores = queries @ vectors[candidates].T
    for user, rows in enumerate(banned):
        if len(rows):
            scores[user, np.searchsorted(candidates, rows[allowed[rows]])] = -np.inf
    take = min(k, len(candidates))
    part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    rows = candidates[np.take_along_axis(part, order, axis=1)]
    got = np.take_along_axis(part_scores, order, axis=1)
    finite = np.isfinite(got)
    out_rows[:, :take] = np.where(finite, rows, -1)
    out_scores[:, :take] = np.where(finite, got, np.nan)
    return out_rows, out_scores


def top_k(
    index: CandidateIndex,
    vectors: np.ndarray,
    queries: np.ndarray,
    banned: Sequence[Rows] | BannedRows,
    allowed: np.ndarray,
    k: int,
    knobs: Mapping[str, Any],
    n_allowed: int | None = None,
) -> TopK:
    """(rows, scores) of shape (n, k), padded with -1 / NaN; ``allowed`` (a mask over the
    catalogue) and each user's ``banned`` rows (sorted and unique) always hold.

    A filter that leaves at most ``EXACT_SUBSET_MAX`` items is scored exactly over those
    items (cheaper than searching for them, and complete). Otherwise each user's fetch
    size depends only on that user (rounded up to a power of two, so users group into few
    searches): a user gets the same answer alone or in a batch, even from indexes whose
    results depend on k (HNSW, PQ with re-ranking).
    """
    n_users, n_items = len(queries), index.size
    out_rows, out_scores = empty_top_k(n_users, k)
    n_allowed = int(allowed.sum()) if n_allowed is None else n_allowed
    if n_allowed == 0 or n_users == 0:
        return out_rows, out_scores
    batch = BannedRows.of(banned)
    if n_allowed <= EXACT_SUBSET_MAX and n_allowed < n_items:
        return _exact_subset(vectors, queries, batch.per_user(), allowed, k)
    if n_users == 1:
        rows, scores = top_k_one(index, queries, batch.rows, allowed, n_allowed, k, knobs)
        out_rows[0, : len(rows)], out_scores[0, : len(rows)] = rows, scores
        return out_rows, out_scores
    # every user's banned rows as one sorted array of user * n_items + row codes
    lengths = batch.lengths
    codes = None
    if lengths.any():
        codes = batch.rows + np.repeat(np.arange(n_users) * n_items, lengths)
    everything = n_allowed == n_items
    exact = index.prefix_consistent
    if exact:
        # this index's top-f is the first f of its top-F for F > f (exact and IVF
        # searches): one search for the most any user needs answers each as alone
        most = fetch_size(k, int(lengths.max()), n_items, n_allowed, exact)
        fetch = np.full(n_users, most, dtype=np.int64)
    else:  # the size each user would get alone (few distinct sizes: few searches)
        sizes = {n: fetch_size(k, int(n), n_items, n_allowed, exact) for n in np.unique(lengths)}
        fetch = np.fromiter((sizes[n] for n in lengths), np.int64, n_users)
    pending = np.arange(n_users)
    while len(pending):
        short_rows = []
        for size in np.unique(fetch[pending]):
            group = pending[fetch[pending] == size]
            asked_queries = queries if len(group) == n_users else queries[group]
            scores, rows = index.search(asked_queries, int(size), knobs)
            valid = rows >= 0
            if not everything:
                valid &= allowed[np.where(valid, rows, 0)]
            if codes is not None:
                asked = group[:, None] * n_items + np.where(valid, rows, 0)
                found = np.minimum(np.searchsorted(codes, asked), len(codes) - 1)
                valid &= codes[found] != asked
            order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
            picked_valid = np.take_along_axis(valid, order, axis=1)
            width = order.shape[1]
            out_rows[group, :width] = np.where(
                picked_valid, np.take_along_axis(rows, order, axis=1), -1
            )
            out_scores[group, :width] = np.where(
                picked_valid, np.take_along_axis(scores, order, axis=1), np.nan
            )
            if size < n_items:
                short_rows.append(group[picked_valid.sum(axis=1) < k])
        pending = np.concatenate(short_rows) if short_rows else np.zeros(0, np.int64)
        fetch[pending] = np.minimum(n_items, fetch[pending] * 4)
    return out_rows, out_scores


def fetch_size(k: int, n_banned: int, n_items: int, n_allowed: int, exact: bool) -> int:
    """How many neighbours to ask the index for first: enough for ``k`` after the banned
    rows and the filter's share, rounded up to a power of two unless the index is
    prefix-consistent (as :func:`top_k` does for a batch, so one user gets the same
    answer alone or in a batch)."""
    want = max(1, -(-(k + n_banned) * n_items // n_allowed))
    return min(n_items, want if exact else 1 << (want - 1).bit_length())


def top_k_one(
    index: CandidateIndex,
    query: np.ndarray,
    banned: Rows,
    allowed: np.ndarray,
    n_allowed: int,
    k: int,
    knobs: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` for one user (``query`` of shape (1, d)) without the batch
    bookkeeping: 1-D rows and scores, at most ``k``, no padding. The exact-subset
    shortcut of :func:`top_k` is the caller's to take."""
    n_items = index.size
    if n_allowed == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    fetch = fetch_size(k, len(banned), n_items, n_allowed, index.prefix_consistent)
    while True:
        scores, rows = index.search(query, fetch, knobs)
        rows, scores = rows[0], scores[0]
        valid = rows >= 0
        if n_allowed < n_items:
            valid &= allowed[np.where(valid, rows, 0)]
        if len(banned):
            found = np.minimum(np.searchsorted(banned, rows), len(banned) - 1)
            valid &= banned[found] != rows
        picked = np.flatnonzero(valid)[:k]
        if len(picked) == k or fetch >= n_items:
            return rows[picked], scores[picked]
        fetch = min(n_items, fetch * 4)


def merge_top_k(first: TopK, second: TopK, k: int) -> TopK:
    """The best ``k`` of two (rows, scores) top lists per user (rows disjoint, padded with
    -1 / NaN), by score; ties keep ``first``'s entry first. Same padding out."""
    rows = np.concatenate([first[0], second[0]], axis=1)
    scores = np.concatenate([first[1], second[1]], axis=1)
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def most_popular(
    popularity: np.ndarray, banned: Rows, allowed: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` allowed, not banned rows with the highest training counts (ties by row),
    scored by those counts."""
    ok = allowed.copy()
    ok[banned] = False
    rows = np.flatnonzero(ok)
    order = np.lexsort((rows, -popularity[rows]))[:k]
    return rows[order], popularity[rows[order]]
