"""FAISS helpers shared by export and serving: search-time knobs, ANN recall.

Search-time knobs (``nprobe`` for IVF, ``efSearch`` for HNSW, ``k_factor`` for a
refining index) are passed per call as ``faiss.SearchParameters``, never set on the
index, so concurrent searches with different knobs do not interfere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import faiss
import numpy as np

from twotower.errors import RequestError

SEARCH_KNOBS = ("nprobe", "efSearch", "k_factor")


def index_kind(index: faiss.Index) -> dict[str, bool]:
    """Which knobs apply: an IVF inside, an HNSW graph, a refining wrapper."""
    index = faiss.downcast_index(index)
    refine = isinstance(index, faiss.IndexRefine)
    base = faiss.downcast_index(index.base_index) if refine else index
    return {
        "ivf": faiss.try_extract_index_ivf(base) is not None,
        "hnsw": hasattr(base, "hnsw"),
        "refine": refine,
    }


def applicable_knobs(index: faiss.Index) -> list[str]:
    kind = index_kind(index)
    return [
        k
        for k, ok in (
            ("nprobe", kind["ivf"]),
            ("efSearch", kind["hnsw"]),
            ("k_factor", kind["refine"]),
        )
        if ok
    ]


def search_parameters(
    index: faiss.Index, knobs: Mapping[str, Any]
) -> faiss.SearchParameters | None:
    """``faiss.SearchParameters`` for ``index`` from ``{"nprobe": 16, ...}``; knobs that do
    not apply to this index are an error, so a typo never goes unnoticed."""
    unknown = set(knobs) - set(SEARCH_KNOBS)
    if unknown:
        raise RequestError(f"unknown search knob(s) {sorted(unknown)}; known: {list(SEARCH_KNOBS)}")
    usable = applicable_knobs(index)
    wrong = [k for k in knobs if k not in usable]
    if wrong:
        raise RequestError(f"search knob(s) {wrong} do not apply to this index (it takes {usable})")
    for name, value in knobs.items():
        number = (
            float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0
        )
        if not (1 <= number <= 1_000_000) or (name != "k_factor" and number != int(number)):
            raise RequestError(
                f"search knob {name} must be {'a number' if name == 'k_factor' else 'an integer'}"
                f" in 1..1000000, got {value!r}"
            )
    kind = index_kind(index)
    base: faiss.SearchParameters | None = None
    if kind["ivf"] and "nprobe" in knobs:
        base = faiss.SearchParametersIVF(nprobe=int(knobs["nprobe"]))
    elif kind["hnsw"] and "efSearch" in knobs:
        base = faiss.SearchParametersHNSW(efSearch=int(knobs["efSearch"]))
    if kind["refine"]:
        params = faiss.IndexRefineSearchParameters(k_factor=float(knobs.get("k_factor", 1.0)))
        if base is not None:
            params.base_index_params = base
            params._base = base  # keep the Python object alive as long as params
        return params
    return base


def search(
    index: faiss.Index, queries: np.ndarray, k: int, knobs: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with per-call knobs; ``k`` is capped at the index size."""
    k = max(1, min(int(k), index.ntotal))
    params = search_parameters(index, knobs or {})
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if params is None:
        return index.search(queries, k)
    return index.search(queries, k, params=params)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Rows of the exact top-``k`` of each query by inner product (brute force, no copy of
    ``vectors``)."""
    k = min(k, len(vectors))
    _, truth = faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(vectors, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return truth


def ann_recall(
    index: faiss.Index,
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    knobs: Mapping[str, Any] | None = None,
    truth: np.ndarray | None = None,
) -> float:
    """Share of the exact top-``k`` (inner product over ``vectors``) that ``index`` returns;
    ``truth``: :func:`exact_neighbours` of the queries, when already computed."""
    from faiss.contrib.evaluation import knn_intersection_measure

    k = min(k, len(vectors))
    if truth is None:
        truth = exact_neighbours(vectors, queries, k)
    _, found = search(index, queries, k, knobs)
    return float(knn_intersection_measure(found, truth[:, :k]))


def auto_factory(n_items: int, dim: int = 64) -> str:
    """A sensible index for the catalogue size: exact below 100k items, IVF-Flat up to 2M,
    beyond that IVF-PQ (two dimensions per code byte) with exact re-ranking and an HNSW
    coarse quantizer, ``sqrt(n)`` lists (so that training and adding stay minutes on a
    small machine: docs/benchmarks/retrieval.md, "Large catalogues")."""
    if n_items <= 100_000:
        return "Flat"
    if n_items <= 2_000_000:
        nlist = 1 << round(math.log2(4 * math.sqrt(n_items)))
        return f"IVF{nlist},Flat"
    nlist = 1 << round(math.log2(math.sqrt(n_items)))
    codes = max(1, dim // 2) if dim % 2 == 0 else dim
    return f"IVF{nlist}_HNSW32,PQ{codes},RFlat"
