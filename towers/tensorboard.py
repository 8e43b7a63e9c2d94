"""TensorBoard extras: hyperparameters with final metrics, and the item-embedding projector."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from pytorch_lightning.loggers import TensorBoardLogger

from towers.data.schema import ITEM_ID
from twotower.encoding import FeatureEncoders

log = logging.getLogger(__name__)
LABEL_CANDIDATES = ("title", "name")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"model.temperature": 0.1, ...} with scalar values only."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = str(list(value))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = "None" if value is None else value
    return flat


def log_hparams(
    logger: TensorBoardLogger, config: Mapping[str, Any], metrics: Mapping[str, float]
) -> None:
    """The run's config next to its final metrics, for TensorBoard's HPARAMS tab."""
    final = {f"hp/{k}": float(v) for k, v in metrics.items() if not k.endswith("users")}
    logger.log_hyperparams(flatten(config), metrics=final)


def item_labels(
    catalogue: pd.DataFrame, encoders: FeatureEncoders
) -> tuple[list[str], list[list[str]]]:
    """Projector labels: the item id, a title-like column and the first attribute columns."""
    columns = [c for c in LABEL_CANDIDATES if c in catalogue.columns]
    columns += [
        c for c in [*encoders.items.multi_hot, *encoders.items.categorical] if c not in columns
    ][:2]
    header = [ITEM_ID, *columns]
    values = catalogue[header].astype(str).to_numpy().tolist()
    return header, values


def log_item_projector(
    logger: TensorBoardLogger,
    item_vectors: np.ndarray,
    catalogue: pd.DataFrame,
    encoders: FeatureEncoders,
    max_items: int = 5000,
    step: int = 0,
) -> None:
    """Item embeddings with labels for TensorBoard's PROJECTOR tab (first ``max_items``)."""
    n = min(max_items, len(item_vectors))
    if n == 0:
        return
    header, labels = item_labels(catalogue.iloc[:n], encoders)
    metadata: list[Any] = labels if len(header) > 1 else [row[0] for row in labels]
    logger.experiment.add_embedding(
        item_vectors[:n],
        metadata=metadata,
        metadata_header=header if len(header) > 1 else None,
        tag="item_embeddings",
        global_step=step,
    )
    log.info("logged %d item embeddings for the TensorBoard projector", n)
