"""Serving speed: ``Retriever.recommend`` / ``recommend_batch`` next to raw FAISS search.

A synthetic bundle per catalogue size: clustered unit item vectors (synthetic vectors
are fine for scale), a randomly initialised user tower exported to ONNX (so
``recommend`` pays for the real tower), known users with histories, and an index
tuned at export to the recall floor like any bundle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import torch

from retrieval import Retriever
from towers.export.index import build_index, tune_and_check
from towers.export.onnx_export import export_tower
from towers.model.spec import TowerConfig
from towers.model.towers import TowerSpec, TwoTowerModel
from twotower.bundle import Counts, IndexInfo, Manifest, layout, write_bundle
from twotower.bundle.embeddings import write_embeddings
from twotower.encoding import EntityEncoder, FeatureEncoders, Vocabulary

log = logging.getLogger(__name__)


@dataclass
class RetrievalBenchSettings:
    dim: int = 64
    users: int = 2000
    history_length: int = 20
    k: int = 10
    single_calls: int = 1000
    batch_size: int = 256
    batches: int = 16
    seed: int = 0


def clustered_vectors(
    n: int, dim: int, rng: np.random.Generator, clusters: int = 256
) -> np.ndarray:
    centres = rng.normal(size=(clusters, dim))
    vectors = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def synthetic_bundle(path: Path, n_items: int, factory: str, s: RetrievalBenchSettings) -> Path:
    """Write a complete, checksummed bundle for ``n_items`` synthetic items."""
    rng = np.random.default_rng(s.seed)
    item_ids = np.array([f"i{i}" for i in range(n_items)], dtype=object)
    user_ids = np.array([f"u{i}" for i in range(s.users)], dtype=object)
    encoders = FeatureEncoders(
        items=EntityEncoder("item", Vocabulary(list(item_ids)), use_id=True),
        users=EntityEncoder("user", Vocabulary(list(user_ids)), use_id=True),
        history_length=s.history_length,
    )
    torch.manual_seed(s.seed)
    model = TwoTowerModel(
        TowerSpec.from_encoders(encoders), TowerConfig(embedding_dim=s.dim)
    ).eval()
    histories = [list(item_ids[rng.integers(0, n_items, s.history_length)]) for _ in range(s.users)]
    user_inputs = encoders.user_inputs(list(user_ids), encoders.encode_histories(histories), None)
    vectors = clustered_vectors(n_items, s.dim, rng)

    def write_files(staging: Path) -> Manifest:
        export_tower(
            model.user_tower,
            encoders.user_input_names,
            {k: v[:64] for k, v in user_inputs.items()},
            staging / layout.USER_TOWER,
        )
        export_tower(
            model.item_tower,
            encoders.item_input_names,
            encoders.item_inputs(pd.DataFrame({"item_id": item_ids[:64]})),
            staging / layout.ITEM_TOWER,
        )
        with torch.no_grad():
            queries = model.user_tower(
                {k: torch.from_numpy(v[:1000]) for k, v in user_inputs.items()}
            ).numpy()
        index = build_index(vectors, factory)
        report = tune_and_check(index, factory, vectors, queries, k=100, floor=0.95)
        faiss.write_index(index, str(staging / layout.INDEX))
        write_embeddings(staging / layout.ITEM_EMBEDDINGS, "item_id", item_ids, vectors)
        pd.DataFrame(
            {
                "item_id": item_ids,
                layout.COUNT_COLUMN: rng.zipf(1.5, n_items).clip(max=10**6),
                layout.REMOVED_COLUMN: False,
            }
        ).to_parquet(staging / layout.ITEMS, index=False)
        pd.DataFrame(
            {"user_id": user_ids, layout.HISTORY_COLUMN: histories, layout.SEEN_COLUMN: histories}
        ).to_parquet(staging / layout.USERS, index=False)
        encoders.save(staging / layout.ENCODERS)
        return Manifest(
            embedding_dim=s.dim,
            index=IndexInfo(
                factory=report.factory,
                ntotal=n_items,
                search_params=report.knobs,
                recall_k=report.recall_k,
                ann_recall=report.recall,
                recall_queries=report.n_queries,
            ),
            counts=Counts(items=n_items, users=s.users),
            inputs={"user": encoders.user_input_names, "item": encoders.item_input_names},
            config={"synthetic": True},
        )

    return write_bundle(path, write_files)


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def raw_steps(retriever: Retriever, positions: np.ndarray, fetch: int, knobs: dict) -> None:
    """What ``recommend`` does, done raw: the stored tower inputs of known users through
    the ONNX user tower, then one FAISS search of the same index for ``fetch`` neighbours
    (k + the users' seen items, as ``recommend`` asks), with the same knobs."""
    users = retriever.users
    inputs = {name: values[positions] for name, values in users.stored_inputs.items()}
    inputs["history"] = users.stored_histories[positions]
    queries = users.run(inputs)
    params = retriever.catalogue.index.parameters(knobs)
    if params is None:
        retriever.catalogue.index.index.search(queries, fetch)
    else:
        retriever.catalogue.index.index.search(queries, fetch, params=params)


def measure(retriever: Retriever, s: RetrievalBenchSettings, threads: int) -> dict[str, Any]:
    """Latency of one-user calls and throughput of batches, each next to the same two
    steps done raw (ONNX user tower + FAISS search), interleaved call by call."""
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(s.seed + 1)
    users = [f"u{i}" for i in rng.integers(0, s.users, s.single_calls)]
    positions = retriever.users.positions(users)
    knobs = retriever.search_params
    fetch = s.k + s.history_length  # k + the user's seen items
    for i, user in enumerate(users[:20]):  # warm-up
        retriever.recommend(user_id=user, k=s.k)
        raw_steps(retriever, positions[i : i + 1], fetch, knobs)
    single, raw_single = [], []
    for i, user in enumerate(users):
        # alternate which goes first, so neither always finds the caches warmed by the other
        for first in ((0, 1) if i % 2 else (1, 0)):
            start = time.perf_counter()
            if first:
                retriever.recommend(user_id=user, k=s.k)
                single.append(time.perf_counter() - start)
            else:
                raw_steps(retriever, positions[i : i + 1], fetch, knobs)
                raw_single.append(time.perf_counter() - start)
    batch_time = raw_batch_time = 0.0
    for b in range(s.batches):
        batch = [users[(b * s.batch_size + j) % len(users)] for j in range(s.batch_size)]
        for first in ((0, 1) if b % 2 else (1, 0)):
            start = time.perf_counter()
            if first:
                retriever.recommend_batch(batch, k=s.k)
                batch_time += time.perf_counter() - start
            else:
                raw_steps(retriever, retriever.users.positions(batch), fetch, knobs)
                raw_batch_time += time.perf_counter() - start
    n_batched = s.batches * s.batch_size
    p50, p99 = percentiles(single)
    raw_p50, raw_p99 = percentiles(raw_single)
    return {
        "threads": threads,
        "recommend_p50_ms": p50,
        "recommend_p99_ms": p99,
        "raw_p50_ms": raw_p50,
        "raw_p99_ms": raw_p99,
        "p50_ratio": p50 / raw_p50,
        "recommend_batch_qps": n_batched / batch_time,
        "raw_batch_qps": n_batched / raw_batch_time,
        "qps_ratio": raw_batch_time / batch_time,
    }


def run(
    sizes: list[int], factories: dict[int, list[str]], s: RetrievalBenchSettings, workdir: Path
) -> list[dict[str, Any]]:
    all_threads = faiss.omp_get_max_threads()
    rows = []
    for n in sizes:
        for factory in factories[n]:
            start = time.perf_counter()
            bundle = synthetic_bundle(workdir / f"{n}-{factory.replace(',', '_')}", n, factory, s)
            build_s = time.perf_counter() - start
            retriever = Retriever.load(bundle)
            index_info = retriever.manifest.index
            for threads in sorted({1, all_threads}):
                row = {
                    "items": n,
                    "index": index_info.factory,
                    "knobs": str(index_info.search_params or "-"),
                    "ann_recall@100": index_info.ann_recall,
                    "build_s": build_s,
                    **measure(retriever, s, threads),
                }
                log.info("%s", row)
                rows.append(row)
    faiss.omp_set_num_threads(all_threads)
    return rows
