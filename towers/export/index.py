"""The FAISS item index: inner-product metric, any factory string from config."""

from __future__ import annotations

import faiss
import numpy as np


def build_index(vectors: np.ndarray, factory: str = "Flat") -> faiss.Index:
    """An index over ``vectors`` built from a FAISS factory string, metric passed explicitly."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    return index
