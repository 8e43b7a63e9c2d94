"""``twotower prepare``: a prepared directory written on one machine, without Spark.

The same directory as ``twotower spark prepare`` (format
:data:`twotower.spark.shards.PREPARED_FORMAT`, layout in ``docs/spark.md``), from the
single-machine code itself: the tables are read and validated by
:func:`towers.data.readers.load_tables`, split by :func:`towers.data.split.make_split`,
encoded by :func:`towers.data.prepare.prepare_data`; then the training samples and the
split are written a shard at a time from those arrays (each ``samples/`` shard's
history windows and user inputs are built for its rows only). A run trains from it with
``data.prepared=DIR`` and streams its samples with ``data.stream=true``.

Nothing half-written is left at a path: the files go to a staging directory beside the
output, which becomes the output only when complete. For a URL they are staged in a
local temporary directory and uploaded with ``prepared.json`` last (an upload that fails
midway leaves files without it, which no reader takes for a prepared directory).
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from towers.data.ids import id_codes
from towers.data.prepare import PreparedData, prepare_data
from towers.data.readers import load_tables
from towers.data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT
from towers.data.split import item_order_key, make_split, prepare_interactions
from twotower import __version__
from twotower.errors import DataValidationError
from twotower.spark import shards
from twotower.spark.settings import PrepareResult, PrepareSettings, settings_dict
from twotower.storage import (
    check_upload_target,
    exists,
    filesystem,
    is_url,
    local_staging,
    remove,
    upload_tree,
)

log = logging.getLogger(__name__)

PARTS = ("fit", "validation", "test")
WRITER = "twotower prepare"


def run_local_prepare(settings: PrepareSettings) -> PrepareResult:
    """Prepare the data of ``settings`` on this machine and write the prepared directory
    ``settings.output`` (a path or an fsspec URL), which must be absent or empty unless
    ``settings.overwrite``. Bad input raises a :class:`~twotower.errors.TwoTowerError`
    naming the file, column or row, before anything is written."""
    settings.check()
    if settings.format is not None:
        raise ValueError(
            "format: the local writer reads each table by its suffix (a directory by its "
            f"files); got {settings.format!r}"
        )
    check_output(settings.output, settings.overwrite)
    if is_url(settings.output):  # a bucket's root, a missing package or store: fail now
        check_upload_target(settings.output, Path.cwd())
    raw = load_tables(
        settings.interactions,
        settings.items,
        settings.users,
        unknown_items=settings.unknown_items,
        columns={k: v for k, v in settings.columns.items() if v},
    )
    events = prepare_interactions(raw.interactions, settings.min_rating)
    raw.interactions = events.iloc[:0]  # the raw rows are not needed past this point
    split = make_split(
        events,
        test_fraction=settings.test_fraction,
        validation_fraction=settings.validation_fraction,
        min_interactions=settings.min_interactions,
        cold_items=settings.cold_items,
        cold_fraction=settings.cold_fraction,
        seed=settings.seed,
    )
    del events
    data = prepare_data(raw, split, settings.features, settings.fit_on)
    del raw, split
    return write_prepared(data, settings)


def check_output(output: str, overwrite: bool) -> None:
    """Refuse an output directory that exists and is not empty, unless ``overwrite``
    (checked before any work, and again before the output is replaced)."""
    if overwrite or not exists(output):
        return
    if is_url(output):
        fs, path = filesystem(output)
        occupied = not fs.isdir(path) or bool(fs.ls(path))
    else:
        directory = Path(output)
        occupied = not directory.is_dir() or any(directory.iterdir())
    if occupied:
        raise DataValidationError(
            f"{output}: the output directory exists and is not empty (use --overwrite)"
        )


def write_prepared(data: PreparedData, settings: PrepareSettings) -> PrepareResult:
    """Write the prepared directory of ``data`` (prepared with ``settings``, which
    ``prepared.json`` records and a reader trusts: ``settings.items`` says whether the
    catalogue is an item table) at ``settings.output``, staged and then moved (or
    uploaded, manifest last) into place."""
    attributes = [c for c in data.catalogue.columns if c != ITEM_ID]
    if settings.items is None and attributes:
        raise ValueError(
            f"settings.items is None but the catalogue has item attributes {attributes}: "
            "name the item table the data was prepared from"
        )
    output = settings.output
    staging = _staging(output)
    try:
        manifest = _write(staging, data, settings)
        check_output(output, settings.overwrite)  # nothing appeared there meanwhile
        if is_url(output):
            upload_tree(staging, output, last=shards.MANIFEST)
        else:
            _move_into_place(staging, Path(output))
    finally:
        remove(staging)
    log.info(
        "prepared %d samples in %d shard(s) under %s",
        manifest["counts"]["samples"],
        manifest["counts"]["shards"],
        output,
    )
    return PrepareResult(output, manifest)


def _staging(output: str) -> Path:
    if is_url(output):
        return local_staging("twotower-prepare-")
    target = Path(output).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def _move_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` (absent, empty, or replaced with ``--overwrite``) by
    ``staging``: one rename, after the old directory is moved aside."""
    aside = None
    if target.exists() or target.is_symlink():
        aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, aside)
    os.replace(staging, target)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            remove(aside)
        else:
            aside.unlink()


def _write(root: Path, data: PreparedData, settings: PrepareSettings) -> dict[str, Any]:
    fit = data.split.fit if settings.fit_on == "fit" else data.split.train
    n_samples = len(fit)
    n_shards = max(1, math.ceil(n_samples / settings.samples_per_shard))
    write_samples(root / shards.SAMPLES, fit, data, settings.samples_per_shard)
    write_catalogue(root / shards.CATALOGUE, data.catalogue)
    write_split(root / shards.SPLIT, data, n_shards)
    data.encoders.save(root / shards.ENCODERS)  # the bundle's own writer
    manifest = shards.prepared_manifest(
        split_stats=data.split.stats(),
        n_samples=n_samples,
        n_items=len(data.catalogue),
        n_shards=n_shards,
        encoders=data.encoders,
        item_columns=data.encoders.items.columns,
        user_columns=data.encoders.users.columns,
        cold_items=data.split.cold_items,
        settings=settings_dict(settings),
        writer={"writer": WRITER, "twotower": __version__},
    )
    (root / shards.MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def _shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _lists(matrix: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """The rows of a 2-d array as a list column (Spark's ``array<...>``)."""
    rows, width = matrix.shape
    if rows * width >= 2**31:  # a list column's offsets are int32, as Spark writes them
        raise ValueError(
            f"{rows} rows x {width} values is too many for one shard: lower --samples-per-shard"
        )
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, type=pa.int32())
    values = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(offsets, values)


def _ranges(n: int, per_shard: int) -> Iterator[tuple[int, int]]:
    for start in range(0, max(n, 1), per_shard):
        yield start, min(start + per_shard, n)


def write_samples(directory: Path, fit: pd.DataFrame, data: PreparedData, per_shard: int) -> None:
    """``samples/``: one row per training event in sample order, ``per_shard`` rows per
    file, the columns of :mod:`twotower.spark.shards` as ``twotower spark prepare``
    writes them (``history``: the plain leakage-free window)."""
    directory.mkdir(parents=True)
    histories = data.sample_histories
    user_rows = data.sample_user_rows  # None: the user inputs are held per sample
    codes, ids = id_codes(fit[USER_ID])
    user_vocabulary = data.encoders.users.ids.encode(pd.Series(ids, dtype=object))
    # each sample's user among the sample users sorted by id (codes sort as the ids do)
    user_index = user_rows if user_rows is not None else np.unique(codes, return_inverse=True)[1]
    times = fit[TIMESTAMP].to_numpy(np.float64)
    attributes = [n for n in data.encoders.users.input_names if n in shards.USER_ATTRIBUTE_INPUTS]
    rng = np.random.default_rng(0)  # unused at horizon 1
    ranges = list(_ranges(len(fit), per_shard))
    for index, (start, end) in enumerate(tqdm(ranges, desc="samples", unit="shard")):
        positions = np.arange(start, end, dtype=np.int64)
        rows = positions if user_rows is None else user_rows[start:end]
        columns: dict[str, pa.Array] = {
            shards.SAMPLE: pa.array(positions),
            shards.USER_INDEX: pa.array(np.asarray(user_index[start:end], dtype=np.int64)),
            shards.USER_CODE: pa.array(user_vocabulary[codes[start:end]]),
            shards.ITEM_ROW: pa.array(data.sample_item_rows[start:end].astype(np.int64)),
            shards.ITEM_CODE: pa.array(histories.item_codes[start:end].astype(np.int64)),
            shards.TIMESTAMP: pa.array(times[start:end]),
            shards.WEIGHT: pa.array(data.sample_weights[start:end].astype(np.float32)),
            shards.HISTORY_START: pa.array(histories.starts[start:end].astype(np.int64)),
            shards.HISTORY_END: pa.array(histories.ends[start:end].astype(np.int64)),
            shards.HISTORY: _lists(histories.windows(positions, 1, rng), pa.int64()),
        }
        for name in attributes:
            values = data.sample_user_inputs[name][rows]
            kind = pa.float32() if name == "user_num" else pa.int64()
            columns[name] = _lists(values.astype(kind.to_pandas_dtype()), kind)
        pq.write_table(pa.table(columns), directory / _shard_name(index))


def write_catalogue(directory: Path, catalogue: pd.DataFrame) -> None:
    """``catalogue/``: the item table in catalogue order, ``item_row`` first."""
    directory.mkdir()
    table = catalogue.reset_index(drop=True)
    table.insert(0, shards.ITEM_ROW, np.arange(len(table), dtype=np.int64))
    table[ITEM_ID] = table[ITEM_ID].astype(str).astype(object)  # ids as the strings they are
    try:
        arrow = pa.Table.from_pandas(table, preserve_index=False)
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:  # e.g. a column mixing types
        raise DataValidationError(
            f"the item table: a column cannot be written to Parquet ({exc}); give each "
            "column one type"
        ) from exc
    # text as Spark writes it (pandas' string dtype becomes Arrow's large_string)
    schema = pa.schema(
        [f.with_type(pa.string()) if f.type == pa.large_string() else f for f in arrow.schema]
    )
    pq.write_table(arrow.cast(schema), directory / _shard_name(0))


def write_split(directory: Path, data: PreparedData, n_shards: int) -> None:
    """``split/``: every prepared event in the events' order (user, time, item order)
    with its part, in ``n_shards`` files."""
    directory.mkdir()
    parts = [getattr(data.split, name) for name in PARTS]
    labels = np.repeat(np.arange(len(PARTS), dtype=np.int8), [len(p) for p in parts])
    users = pd.concat([p[USER_ID] for p in parts], ignore_index=True)
    items = pd.concat([p[ITEM_ID] for p in parts], ignore_index=True)
    times = np.concatenate([p[TIMESTAMP].to_numpy(np.float64) for p in parts])
    weights = None
    if WEIGHT in parts[0].columns:
        weights = np.concatenate([p[WEIGHT].to_numpy(np.float64) for p in parts])
    user_codes, user_ids = id_codes(users)
    item_codes, item_ids = id_codes(items)
    order = np.lexsort((item_order_key(items), times, user_codes))
    del users, items
    part_names = np.asarray(PARTS, dtype=object)
    bounds = np.linspace(0, len(order), n_shards + 1).round().astype(np.int64)
    for index in tqdm(range(n_shards), desc="split", unit="shard"):
        rows = order[bounds[index] : bounds[index + 1]]
        columns: dict[str, Any] = {
            shards.EVENT: pa.array(np.arange(bounds[index], bounds[index + 1], dtype=np.int64)),
            USER_ID: pa.array(user_ids[user_codes[rows]], type=pa.string()),
            ITEM_ID: pa.array(item_ids[item_codes[rows]], type=pa.string()),
            TIMESTAMP: pa.array(times[rows]),
        }
        if weights is not None:
            columns[WEIGHT] = pa.array(weights[rows])
        columns[shards.PART] = pa.array(part_names[labels[rows]], type=pa.string())
        pq.write_table(pa.table(columns), directory / _shard_name(index))
