"""Build the FAISS item index from config, tune its search knobs, and check ANN recall.

The recall check uses real query vectors (the users of the evaluation set), compares
the index with exact search over the same item vectors, and fails the export below a
floor (default 0.95 at K=100) rather than ship an index that loses items.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from retrieval.index import (
    ann_recall,
    applicable_knobs,
    auto_factory,
    exact_neighbours,
    index_kind,
)
from towers.export.onnx_export import ExportError

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    """What the export chose and measured."""

    factory: str
    knobs: dict[str, Any] = field(default_factory=dict)
    recall: float = 1.0
    recall_k: int = 100
    n_queries: int = 0


TRAIN_POINTS_PER_LIST = 256  # FAISS's own max_points_per_centroid
ADD_CHUNK = 1 << 20


def build_index(vectors: np.ndarray, factory: str = "Flat", seed: int = 0) -> faiss.Index:
    """An index over ``vectors`` from a FAISS factory string (or ``auto``), metric passed
    explicitly: inner product, the towers' metric (IVF would default to L2). Vectors are
    added in chunks; ``seed`` draws the training sample (:func:`training_sample`)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if factory == "auto":
        factory = auto_factory(*vectors.shape)
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(training_sample(index, vectors, seed))
    for lo in range(0, len(vectors), ADD_CHUNK):
        index.add(vectors[lo : lo + ADD_CHUNK])
    return index


def training_sample(index: faiss.Index, vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """What the index trains on: every vector, or for an IVF index at most
    ``TRAIN_POINTS_PER_LIST`` per list, a seeded sample drawn here rather than inside
    FAISS, so that the 10M-vector catalogue is never copied for training."""
    ivf = faiss.try_extract_index_ivf(index)
    limit = max(TRAIN_POINTS_PER_LIST * ivf.nlist, 10_000) if ivf else len(vectors)
    if len(vectors) <= limit:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), limit, replace=False))
    return vectors[rows]


def _candidate_knobs(index: faiss.Index, k: int) -> list[dict[str, Any]]:
    """Increasingly expensive knob settings to try, cheapest first."""
    kind = index_kind(index)
    settings: list[dict[str, Any]] = []
    ivf = faiss.try_extract_index_ivf(index)
    nprobes = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if ivf and n <= ivf.nlist]
    if ivf and ivf.nlist not in nprobes:
        nprobes.append(ivf.nlist)
    for nprobe in nprobes or [None]:
        for ef in [max(k, 16) * m for m in (1, 2, 4, 8, 16)] if kind["hnsw"] else [None]:
            for k_factor in (1, 2, 4, 8, 16) if kind["refine"] else (None,):
                knobs = {"nprobe": nprobe, "efSearch": ef, "k_factor": k_factor}
                settings.append({key: v for key, v in knobs.items() if v is not None})
    return sorted(
        settings, key=lambda s: (s.get("nprobe", 0), s.get("efSearch", 0), s.get("k_factor", 0))
    )


def tune_and_check(
    index: faiss.Index,
    factory: str,
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int = 100,
    floor: float = 0.95,
    knobs: Mapping[str, Any] | None = None,
) -> IndexReport:
    """Measure recall@k against exact search; with no ``knobs`` given, pick the cheapest
    setting reaching ``floor``. Raises :class:`ExportError` when the floor is not met."""
    k = min(k, len(vectors))
    if knobs:
        tried = [dict(knobs)]
    elif applicable_knobs(index):
        tried = _candidate_knobs(index, k)
    else:
        tried = [{}]
    recall, chosen = 0.0, tried[-1]
    truth = exact_neighbours(vectors, queries, k)  # once for every setting tried
    for setting in tried:
        recall = ann_recall(index, vectors, queries, k, setting, truth)
        chosen = setting
        if recall >= floor:
            break
    log.info(
        "index %s: ANN recall@%d = %.4f with %s on %d real queries",
        factory,
        k,
        recall,
        chosen,
        len(queries),
    )
    if recall < floor:
        raise ExportError(
            f"index '{factory}' reaches ANN recall@{k} {recall:.4f} < floor {floor} "
            f"(best knobs tried: {chosen}); use a less lossy index or lower export.recall_floor"
        )
    return IndexReport(factory, chosen, recall, k, len(queries))
