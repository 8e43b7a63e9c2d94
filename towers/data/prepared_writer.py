"""``twotower prepare``: a prepared directory written on one machine, without Spark.

The same directory as ``twotower spark prepare`` (format
:data:`twotower.spark.shards.PREPARED_FORMAT`, layout in ``docs/spark.md``), from the
single-machine code itself: the tables are read and validated by
:func:`towers.data.readers.load_tables`, split by :func:`towers.data.split.make_split`,
encoded by :func:`towers.data.prepare.fit_encoders` and
:func:`towers.data.prepare.build_training_samples` (no evaluation sets: a run builds
them from ``split/``); then the training samples are written a row group at a time
(each group's history windows and user inputs built for its rows only) and the split in
files of whole users (about as many events in each), each built from its users' rows of
the three parts. A run trains from it with
``data.prepared=DIR`` and streams its samples with ``data.stream=true``.

Nothing half-written is left at a path: the files go to a staging directory beside the
output, which becomes the output only when complete. For a URL they are staged in a
local temporary directory and uploaded with ``prepared.json`` last (an upload that fails
midway leaves files without it, which no reader takes for a prepared directory).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from towers.data.ids import id_codes
from towers.data.prepare import (
    PreparedData,
    TrainingSamples,
    build_training_samples,
    fit_encoders,
)
from towers.data.readers import load_tables
from towers.data.samples import ascending
from towers.data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT
from towers.data.split import Split, id_order_ranks, make_split, prepare_interactions
from twotower import __version__
from twotower.encoding import FeatureEncoders
from twotower.encoding.vocabulary import code_counts
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
# samples built and written at once, a row group of a samples/ file (the history windows
# of 1M samples alone are 400 MB; 128k samples keep each step near 100 MB)
ROWS_PER_GROUP = 1 << 17
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
        keep_train=settings.fit_on == "train",  # else the three parts are all it writes
    )
    del events
    # no evaluation sets: a run builds them from split/
    catalogue = raw.items.reset_index(drop=True)
    fit = split.fit if settings.fit_on == "fit" else split.train
    encoders = fit_encoders(raw, fit, settings.features)
    samples = build_training_samples(raw, fit, catalogue, encoders)
    del raw, fit
    return write_prepared(PreparedParts(split, catalogue, encoders, samples), settings)


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


@dataclass
class PreparedParts:
    """What a prepared directory is written from: the split, the catalogue, the fitted
    encoders and the training samples (a run builds the evaluation sets from ``split/``)."""

    split: Split
    catalogue: pd.DataFrame
    encoders: FeatureEncoders
    samples: TrainingSamples

    @classmethod
    def of(cls, data: PreparedData) -> PreparedParts:
        """The parts of an in-memory preparation."""
        samples = TrainingSamples(
            user_inputs=data.sample_user_inputs,
            item_rows=data.sample_item_rows,
            weights=data.sample_weights,
            histories=data.sample_histories,
            item_log_p=data.item_log_p,
            user_rows=data.sample_user_rows,
        )
        return cls(data.split, data.catalogue, data.encoders, samples)


def write_prepared(data: PreparedData | PreparedParts, settings: PrepareSettings) -> PrepareResult:
    """Write the prepared directory of ``data`` (prepared with ``settings``, which
    ``prepared.json`` records and a reader trusts: ``settings.items`` says whether the
    catalogue is an item table) at ``settings.output``, staged and then moved (or
    uploaded, manifest last) into place."""
    if isinstance(data, PreparedData):
        data = PreparedParts.of(data)
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


def _write(root: Path, data: PreparedParts, settings: PrepareSettings) -> dict[str, Any]:
    fit = data.split.fit if settings.fit_on == "fit" else data.split.train
    n_samples = len(fit)
    n_shards = max(1, math.ceil(n_samples / settings.samples_per_shard))
    write_samples(
        root / shards.SAMPLES, fit, data.samples, data.encoders, settings.samples_per_shard
    )
    write_catalogue(root / shards.CATALOGUE, data.catalogue)
    write_split(root / shards.SPLIT, data.split, n_shards)
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
            f"{rows} rows x {width} values is too many for one Parquet list column "
            "(its offsets are int32)"
        )
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, type=pa.int32())
    values = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(offsets, values)


def _ranges(n: int, per_shard: int) -> Iterator[tuple[int, int]]:
    for start in range(0, max(n, 1), per_shard):
        yield start, min(start + per_shard, n)


def write_samples(
    directory: Path,
    fit: pd.DataFrame,
    samples: TrainingSamples,
    encoders: FeatureEncoders,
    per_shard: int,
) -> None:
    """``samples/``: one row per training event in sample order, ``per_shard`` rows per
    file, the columns of :mod:`twotower.spark.shards` as ``twotower spark prepare``
    writes them (``history``: the plain leakage-free window). Each file is built and
    written :data:`ROWS_PER_GROUP` rows (one row group) at a time."""
    directory.mkdir(parents=True)
    histories = samples.histories
    user_rows = samples.user_rows  # None: the user inputs are held per sample
    codes, ids = id_codes(fit[USER_ID])
    user_vocabulary = encoders.users.ids.encode(pd.Series(ids, dtype=object))
    # each sample's user among the sample users sorted by id (codes sort as the ids do)
    user_index = user_rows if user_rows is not None else np.unique(codes, return_inverse=True)[1]
    times = fit[TIMESTAMP].to_numpy(np.float64)
    attributes = [n for n in encoders.users.input_names if n in shards.USER_ATTRIBUTE_INPUTS]
    rng = np.random.default_rng(0)  # unused at horizon 1

    def rows_table(start: int, end: int) -> pa.Table:
        positions = np.arange(start, end, dtype=np.int64)
        rows = positions if user_rows is None else user_rows[start:end]
        columns: dict[str, pa.Array] = {
            shards.SAMPLE: pa.array(positions),
            shards.USER_INDEX: pa.array(np.asarray(user_index[start:end], dtype=np.int64)),
            shards.USER_CODE: pa.array(user_vocabulary[codes[start:end]]),
            shards.ITEM_ROW: pa.array(samples.item_rows[start:end].astype(np.int64)),
            shards.ITEM_CODE: pa.array(histories.item_codes[start:end].astype(np.int64)),
            shards.TIMESTAMP: pa.array(times[start:end]),
            shards.WEIGHT: pa.array(samples.weights[start:end].astype(np.float32)),
            shards.HISTORY_START: pa.array(histories.starts[start:end].astype(np.int64)),
            shards.HISTORY_END: pa.array(histories.ends[start:end].astype(np.int64)),
            shards.HISTORY: _lists(histories.windows(positions, 1, rng), pa.int64()),
        }
        for name in attributes:
            values = samples.user_inputs[name][rows]
            kind = pa.float32() if name == "user_num" else pa.int64()
            columns[name] = _lists(values.astype(kind.to_pandas_dtype()), kind)
        return pa.table(columns)

    ranges = list(_ranges(len(fit), per_shard))
    for index, (start, end) in enumerate(tqdm(ranges, desc="samples", unit="shard")):
        groups = list(_ranges(end - start, ROWS_PER_GROUP))
        first = rows_table(start, start + groups[0][1])
        with pq.ParquetWriter(directory / _shard_name(index), first.schema) as writer:
            writer.write_table(first)
            del first
            for lo, hi in groups[1:]:
                writer.write_table(rows_table(start + lo, start + hi))


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


def write_split(directory: Path, split: Split, n_shards: int) -> None:
    """``split/``: every prepared event in the events' order (user, time, item order)
    with its part, in about ``n_shards`` files of whole users. Each file is built from its
    users' rows of the parts (each in event order), so the events are never gathered
    into one table."""
    directory.mkdir()
    parts = [getattr(split, name) for name in PARTS]
    users = _common_codes([p[USER_ID] for p in parts])
    items = _common_codes([p[ITEM_ID] for p in parts])
    used = np.zeros(len(items.ids), dtype=bool)
    for codes in items.codes:
        used |= code_counts(codes, len(items.ids)) > 0
    item_rank = id_order_ranks(items.ids, used)
    user_rows = [
        _user_row_bounds(codes, len(users.ids), name)
        for codes, name in zip(users.codes, PARTS, strict=True)
    ]
    # whole users per file, about as many events in each
    events_before = np.concatenate([[0], np.cumsum(sum(b[1:] - b[:-1] for b in user_rows))])
    n_events = int(events_before[-1])
    targets = np.linspace(0, n_events, n_shards + 1)[1:-1]
    cuts = np.unique(np.r_[0, np.searchsorted(events_before, targets), len(users.ids)])
    has_weight = WEIGHT in parts[0].columns
    part_names = np.asarray(PARTS, dtype=object)
    index = 0
    for lo, hi in tqdm(list(itertools.pairwise(cuts)), desc="split", unit="shard"):
        if events_before[hi] == events_before[lo]:
            continue
        pieces = [(k, b[lo], b[hi]) for k, b in enumerate(user_rows)]
        user_codes = np.concatenate([users.codes[k][a:b] for k, a, b in pieces])
        item_codes = np.concatenate([items.codes[k][a:b] for k, a, b in pieces])
        times = np.concatenate(
            [parts[k][TIMESTAMP].to_numpy()[a:b].astype(np.float64) for k, a, b in pieces]
        )
        labels = np.concatenate([np.full(b - a, k, dtype=np.int8) for k, a, b in pieces])
        order = np.lexsort((item_rank[item_codes], times, user_codes))
        first = int(events_before[lo])
        columns: dict[str, Any] = {
            shards.EVENT: pa.array(np.arange(first, first + len(order), dtype=np.int64)),
            USER_ID: pa.array(users.ids[user_codes[order]], type=pa.string()),
            ITEM_ID: pa.array(items.ids[item_codes[order]], type=pa.string()),
            TIMESTAMP: pa.array(times[order]),
        }
        if has_weight:
            weights = np.concatenate(
                [parts[k][WEIGHT].to_numpy()[a:b].astype(np.float64) for k, a, b in pieces]
            )
            columns[WEIGHT] = pa.array(weights[order])
        columns[shards.PART] = pa.array(part_names[labels[order]], type=pa.string())
        pq.write_table(pa.table(columns), directory / _shard_name(index))
        index += 1
    if index == 0:  # no events at all: one empty file, as for an empty part
        empty = {
            shards.EVENT: pa.array([], pa.int64()),
            USER_ID: pa.array([], pa.string()),
            ITEM_ID: pa.array([], pa.string()),
            TIMESTAMP: pa.array([], pa.float64()),
        }
        if has_weight:
            empty[WEIGHT] = pa.array([], pa.float64())
        empty[shards.PART] = pa.array([], pa.string())
        pq.write_table(pa.table(empty), directory / _shard_name(0))


@dataclass
class _CommonCodes:
    """Id columns' codes over one set of ids (sorted strings), a code array per column."""

    codes: list[np.ndarray]
    ids: np.ndarray


def _common_codes(columns: list[pd.Series]) -> _CommonCodes:
    """The codes of ``columns`` over their ids together: each column's own codes when
    they all have the same ids (the parts of one split do), else recoded."""
    coded = [id_codes(column) for column in columns]
    ids = coded[0][1]
    if all(len(other) == len(ids) and (other == ids).all() for _, other in coded[1:]):
        return _CommonCodes([codes for codes, _ in coded], ids)
    union = np.unique(np.concatenate([other for _, other in coded]))
    index = pd.Index(union, dtype=object)
    recoded = [index.get_indexer(other).astype(np.int32)[codes] for codes, other in coded]
    return _CommonCodes(recoded, union)


def _user_row_bounds(codes: np.ndarray, n_users: int, part: str) -> np.ndarray:
    """Where each user's rows start in a part sorted by user (``n_users + 1`` bounds)."""
    if not ascending(codes):
        raise ValueError(f"the {part} part is not sorted by user")
    # the codes' own dtype: searchsorted casts both sides to a common type (a copy)
    return np.searchsorted(codes, np.arange(n_users + 1, dtype=codes.dtype))
