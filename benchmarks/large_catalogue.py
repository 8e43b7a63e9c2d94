"""A large catalogue on one machine: build the ``index=auto`` index for millions of items.

Synthetic clustered unit vectors (as in the retrieval benchmark) stand in for item
embeddings; queries are drawn the same way. The benchmark builds the index that
``export.index=auto`` picks at that size (IVF-PQ with an HNSW coarse quantizer and exact
re-ranking), through the exporter's own :func:`~towers.export.index.build_index`, and
reports build time (train, add), index size and the process's peak RSS, then recall@k
against exact search and query latency for a ladder of search knobs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from benchmarks.scale import GB, PeakRss, rss_bytes
from retrieval.index import auto_factory, exact_neighbours, search
from towers.export.index import build_index

log = logging.getLogger(__name__)


@dataclass
class LargeCatalogueSettings:
    items: int = 10_000_000
    dim: int = 64
    clusters: int = 4096
    queries: int = 1000
    latency_queries: int = 300
    k: int = 100
    seed: int = 0


def clustered(
    n: int, dim: int, centres: np.ndarray, rng: np.random.Generator, chunk: int = 1 << 20
) -> np.ndarray:
    """``n`` unit vectors around random ``centres`` (float32, built in chunks)."""
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        block = centres[rng.integers(0, len(centres), hi - lo)]
        block += 0.6 * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        out[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def knob_ladder(index: faiss.Index) -> list[dict[str, Any]]:
    """nprobe x k_factor settings to report."""
    ivf = faiss.try_extract_index_ivf(index)
    nprobes = [n for n in (8, 16, 32, 64, 128) if ivf is not None and n <= ivf.nlist]
    refine = isinstance(index, faiss.IndexRefine)
    factors = (1, 4, 16) if refine else (None,)
    return [
        {k: v for k, v in {"nprobe": n, "k_factor": f}.items() if v is not None}
        for n in nprobes
        for f in factors
    ]


def run(s: LargeCatalogueSettings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the build's figures, one row per search setting)."""
    rng = np.random.default_rng(s.seed)
    centres = rng.standard_normal((s.clusters, s.dim), dtype=np.float32)
    before = rss_bytes()
    vectors = clustered(s.items, s.dim, centres, rng)
    queries = clustered(s.queries, s.dim, centres, rng)
    factory = auto_factory(s.items, s.dim)
    log.info("%d items: index=auto picks %s", s.items, factory)
    sampler = PeakRss(interval=0.2)
    build: dict[str, Any] = {"items": s.items, "dim": s.dim, "factory": factory}
    with sampler.stage(build):
        index = build_index(vectors, factory, s.seed)
    build["build_seconds"] = build.pop("seconds")
    build["peak_rss_gb"] = round(build["peak_rss_gb"], 2)
    build["vectors_gb"] = round(vectors.nbytes / GB, 2)
    build["index_gb"] = round(len(faiss.serialize_index(index)) / GB, 2)
    build["rss_before_vectors_gb"] = round(before / GB, 2)
    started = time.perf_counter()
    truth = exact_neighbours(vectors, queries, s.k)
    build["exact_search_seconds_per_query"] = round((time.perf_counter() - started) / s.queries, 4)
    sampler.close()
    rows = []
    for knobs in knob_ladder(index):
        _, found = search(index, queries, s.k, knobs)
        recall = float(
            np.mean([len(np.intersect1d(f, t)) / s.k for f, t in zip(found, truth, strict=True)])
        )
        single = []
        for query in queries[: s.latency_queries]:
            started = time.perf_counter()
            search(index, query[None, :], s.k, knobs)
            single.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        search(index, queries, s.k, knobs)
        batch_seconds = time.perf_counter() - started
        rows.append(
            {
                **{key: knobs.get(key, "") for key in ("nprobe", "k_factor")},
                f"recall@{s.k}": round(recall, 4),
                "p50_ms": round(float(np.percentile(single, 50)), 2),
                "p99_ms": round(float(np.percentile(single, 99)), 2),
                "batch_qps": round(s.queries / batch_seconds),
            }
        )
        log.info("%s", rows[-1])
    return build, rows
