"""The prepare job's output directory (format :data:`PREPARED_FORMAT`) and its reader.

A trainer reads it without Spark (pyarrow): :func:`read_samples` rebuilds exactly the
arrays :func:`towers.data.prepare.prepare_data` builds on one machine
(``sample_user_inputs``, ``sample_item_rows``, ``sample_weights``,
``sample_histories``). See ``docs/spark.md`` for the layout.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from towers.data.samples import HistorySource
from twotower.bundle import layout
from twotower.encoding import FeatureColumns, FeatureEncoders

PREPARED_FORMAT = 1
MANIFEST = "prepared.json"
ENCODERS = layout.ENCODERS  # the bundle's own file name and format
SAMPLES = "samples"
CATALOGUE = "catalogue"
SPLIT = "split"

# the columns of samples/, one row per training event in sample order
SAMPLE = "sample"
USER_INDEX = "user_index"
USER_CODE = "user_code"
ITEM_ROW = "item_row"
ITEM_CODE = "item_code"
TIMESTAMP = "timestamp"
WEIGHT = "weight"
HISTORY_START = "history_start"
HISTORY_END = "history_end"
HISTORY = "history"
USER_ATTRIBUTE_INPUTS = ("user_cat", "user_bag", "user_num")
# the columns of split/ besides the events' own
EVENT = "event"
PART = "part"


@dataclass
class Samples:
    """The training samples of a prepared directory, as ``prepare_data`` holds them."""

    user_inputs: dict[str, np.ndarray]  # all but the history
    item_rows: np.ndarray
    weights: np.ndarray
    timestamps: np.ndarray
    histories: HistorySource

    def __len__(self) -> int:
        return len(self.item_rows)


def read_manifest(directory: str | Path) -> dict:
    """The ``prepared.json`` of a prepared directory."""
    return json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))


def prepared_manifest(
    *,
    split_stats: dict[str, int],
    n_samples: int,
    n_items: int,
    n_shards: int,
    encoders: FeatureEncoders,
    item_columns: FeatureColumns,
    user_columns: FeatureColumns,
    cold_items: Any,
    settings: dict[str, Any],
    writer: dict[str, str],
) -> dict[str, Any]:
    """The ``prepared.json`` of a prepared directory, whichever job wrote it (``writer``
    names it: Spark's version, or the local writer's)."""
    return {
        "format": PREPARED_FORMAT,
        "counts": {
            **split_stats,
            "samples": n_samples,
            "items": n_items,
            "known_items": len(encoders.items.ids.values),
            "known_users": len(encoders.users.ids.values),
            "shards": n_shards,
        },
        "trained_on": settings["fit_on"],
        "inputs": {"user": encoders.user_input_names, "item": encoders.item_input_names},
        "item_columns": asdict(item_columns),
        "user_columns": asdict(user_columns),
        "cold_items": [str(i) for i in cold_items],
        "settings": settings,
        **writer,
    }


def read_encoders(directory: str | Path) -> FeatureEncoders:
    """The fitted encoders (the bundle's ``encoders.json`` format)."""
    return FeatureEncoders.load(Path(directory) / ENCODERS)


def _matrix(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    column = table.column(name).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    rows = len(column)
    return values.reshape(rows, len(values) // rows if rows else 0)


def sample_columns(user_input_names: list[str]) -> list[str]:
    """The ``samples/`` columns that training reads (not the plain ``history``, which
    is cut again per batch): the user inputs' columns, the item, weight and history
    bounds."""
    inputs = [USER_CODE if name == "user_id" else name for name in user_input_names]
    return [
        *[name for name in inputs if name != HISTORY],
        ITEM_ROW,
        ITEM_CODE,
        WEIGHT,
        HISTORY_START,
        HISTORY_END,
    ]


def user_inputs_of_rows(table: pa.Table, user_input_names: list[str]) -> dict[str, np.ndarray]:
    """The user-tower inputs but the history of each row of a ``samples/`` table, named
    as the towers name them (``user_id`` is the ``user_code`` column)."""
    inputs: dict[str, np.ndarray] = {}
    for name in user_input_names:
        if name == HISTORY:  # cut per batch from ``histories``, as prepare_data does
            continue
        if name == "user_id":
            inputs[name] = table.column(USER_CODE).to_numpy().astype(np.int64)
        elif name == "user_num":
            inputs[name] = _matrix(table, name, np.float32)
        else:
            inputs[name] = _matrix(table, name, np.int64)
    return inputs


def read_samples(directory: str | Path, encoders: FeatureEncoders | None = None) -> Samples:
    """The samples of a prepared directory (a local path, or any URL pyarrow opens), in
    sample order, as :func:`towers.data.prepare.build_training_samples` holds them: the
    user-tower inputs but the history, named as the towers name them (``user_id`` is the
    ``user_code`` column), the catalogue rows, the weights, the times and the
    :class:`HistorySource` that cuts each batch's histories (the ``history`` column holds
    the plain ones, ``histories.windows(positions, 1, rng)``)."""
    encoders = encoders or read_encoders(directory)
    table = pq.read_table(f"{str(directory).rstrip('/')}/{SAMPLES}").sort_by(SAMPLE)
    return Samples(
        user_inputs=user_inputs_of_rows(table, encoders.user_input_names),
        item_rows=table.column(ITEM_ROW).to_numpy().astype(np.int64),
        weights=table.column(WEIGHT).to_numpy().astype(np.float32),
        timestamps=table.column(TIMESTAMP).to_numpy().astype(np.float64),
        histories=HistorySource(
            table.column(ITEM_CODE).to_numpy().astype(np.int64),
            table.column(HISTORY_START).to_numpy().astype(np.int64),
            table.column(HISTORY_END).to_numpy().astype(np.int64),
            encoders.history_length,
        ),
    )
