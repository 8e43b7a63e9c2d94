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


def ann_recall(
    index: faiss.Index,
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    knobs: Mapping[str, Any] | None = None,
) -> float:
    """Share of the exact top-``k`` (inner product over ``vectors``) that ``index`` returns."""
    from faiss.contrib.evaluation import knn_intersection_measure

    k = min(k, len(vectors))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, truth = exact.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    _, found = search(index, queries, k, knobs)
    return float(knn_intersection_measure(found, truth))


def auto_factory(n_items: int) -> str:
    """A sensible index for the catalogue size: exact below 100k items, IVF-Flat up to 2M,
    IVF-PQ with exact re-ranking beyond."""
    if n_items <= 100_000:
        return "Flat"
    nlist = 1 << round(math.log2(4 * math.sqrt(n_items)))
    if n_items <= 2_000_000:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist},PQ32,RFlat"
