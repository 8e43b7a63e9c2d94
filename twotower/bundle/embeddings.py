"""Item / user embeddings as Parquet: an id column and a fixed-size list ``embedding``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_embeddings(path: Path, id_column: str, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Write ids and float32 vectors; readable by pandas, Spark, DuckDB, Polars."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
    table = pa.table(
        {
            id_column: pa.array([str(i) for i in ids], type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        }
    )
    pq.write_table(table, path)


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors (n, d)) from a file written by :func:`write_embeddings`."""
    table = pq.read_table(path)
    ids = np.asarray(table.column(0).to_pylist(), dtype=object)
    column = table.column("embedding").combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return ids, vectors.reshape(len(ids), column.type.list_size)
