"""Pick the data source named by the ``data`` config group and return validated tables."""

from __future__ import annotations

from collections.abc import Mapping
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
