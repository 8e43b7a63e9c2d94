"""Pick the data source named by the ``data`` config group and return validated tables."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from towers.data.movielens import read_movielens_1m, read_movielens_100k, read_movielens_latest
from towers.data.readers import load_tables
from towers.data.schema import RawData
from towers.data.synthetic import generate_synthetic

MOVIELENS_READERS = {
    "movielens_100k": read_movielens_100k,
    "movielens_1m": read_movielens_1m,
    "movielens_latest": read_movielens_latest,
}


def load_data(cfg: Mapping[str, Any]) -> RawData:
    """Tables for ``cfg.kind``: ``synthetic``, ``csv`` (CSV or Parquet) or a MovieLens format."""
    kind = cfg["kind"]
    if kind == "synthetic":
        return generate_synthetic(**dict(cfg["synthetic"]))
    if kind == "csv":
        if not cfg.get("interactions"):
            raise ValueError("data=csv needs data.interactions=FILE (and usually data.items=FILE)")
        return load_tables(
            cfg["interactions"],
            cfg.get("items"),
            cfg.get("users"),
            unknown_items=cfg.get("unknown_items", "error"),
            columns={k: v for k, v in dict(cfg.get("columns") or {}).items() if v},
        )
    if kind in MOVIELENS_READERS:
        if not cfg.get("path"):
            raise ValueError(f"data={kind} needs data.path=DIR (the MovieLens folder)")
        return MOVIELENS_READERS[kind](cfg["path"])
    raise ValueError(
        f"unknown data.kind {kind!r}: use synthetic, csv or one of {sorted(MOVIELENS_READERS)}"
    )


def load_data_in_background(cfg: Mapping[str, Any]) -> Future[RawData]:
    """Start :func:`load_data` in a thread and return its future. numpy and pandas release
    the GIL in their heavy loops, so the built-in generator and the table readers run
    while the caller imports the training stack (torch, Lightning: seconds on a small
    machine). ``future.result()`` returns the tables or raises what ``load_data`` raised."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twotower-data")
    future = executor.submit(load_data, dict(cfg))
    executor.shutdown(wait=False)
    return future
