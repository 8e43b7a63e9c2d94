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
from typing import Any, Protocol

import faiss
import numpy as np

from retrieval.index import search, search_parameters

log = logging.getLogger(__name__)
EXACT_SUBSET_MAX = 4096
Rows = np.ndarray
TopK = tuple[np.ndarray, np.ndarray]  # (rows int64 (n, k) padded -1, scores float32 padded NaN)


class CandidateIndex(Protocol):
    """What :func:`top_k` needs of an index over the catalogue's vectors."""

    @property
    def size(self) -> int: ...

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

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def check_knobs(self, knobs: Mapping[str, Any]) -> None:
        """Raise :class:`~twotower.errors.RequestError` for knobs this index does not take."""
        search_parameters(self.cpu_index, knobs)

    def search(
        self, queries: np.ndarray, k: int, knobs: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        return search(self.index, queries, k, knobs)

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
    banned: Sequence[Rows],
    allowed: np.ndarray,
    k: int,
    knobs: Mapping[str, Any],
) -> TopK:
    """(rows, scores) of shape (n, k), padded with -1 / NaN; ``allowed`` (a mask over the
    catalogue) and each user's ``banned`` rows (sorted, unique) always hold.

    A filter that leaves at most ``EXACT_SUBSET_MAX`` items is scored exactly over those
    items (cheaper than searching for them, and complete). Otherwise each user's fetch
    size depends only on that user (rounded up to a power of two, so users group into few
    searches): a user gets the same answer alone or in a batch, even from indexes whose
    results depend on k (HNSW, PQ with re-ranking).
    """
    n_users, n_items = len(queries), index.size
    out_rows, out_scores = empty_top_k(n_users, k)
    n_allowed = int(allowed.sum())
    if n_allowed == 0 or n_users == 0:
        return out_rows, out_scores
    if n_allowed <= EXACT_SUBSET_MAX and n_allowed < n_items:
        return _exact_subset(vectors, queries, banned, allowed, k)
    any_banned = any(len(b) for b in banned)
    everything = n_allowed == n_items
    want = np.ceil((k + np.array([len(b) for b in banned])) * n_items / n_allowed)
    fetch = np.minimum(n_items, 2 ** np.ceil(np.log2(np.maximum(want, 1)))).astype(np.int64)
    pending = np.arange(n_users)
    while len(pending):
        short_rows = []
        for size in np.unique(fetch[pending]):
            group = pending[fetch[pending] == size]
            scores, rows = index.search(queries[group], int(size), knobs)
            valid = rows >= 0
            if not everything:
                valid &= allowed[np.where(valid, rows, 0)]
            if any_banned:
                for position, user in enumerate(group):
                    if len(banned[user]):
                        valid[position] &= ~np.isin(rows[position], banned[user])
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
