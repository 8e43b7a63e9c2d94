"""Training data from a prepared directory (``twotower prepare``'s or ``twotower spark
prepare``'s output).

``data.prepared=DIR`` makes ``twotower train`` take the split, the encoders, the
catalogue and the training samples from ``DIR`` instead of computing them: the same
:class:`~towers.data.prepare.PreparedData` that :func:`towers.data.prepare.prepare_data`
builds from the same tables and settings. The interactions are not read; the user table
(for the attributes of the evaluation users) is the caller's. Everything is loaded in
memory, as on the single-machine path, unless ``stream=True`` (``data.stream=true``):
then the training samples stay in their shards and training streams them
(:mod:`towers.data.shard_stream`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from towers.data.prepare import (
    PreparedData,
    TrainingSamples,
    assemble_prepared,
    build_eval_sources,
    item_log_p,
    item_log_p_of_counts,
)
from towers.data.samples import HistorySource
from towers.data.schema import ITEM_ID, RawData, validate_entities
from towers.data.shard_stream import SampleShards, SampleStats, SampleStream
from towers.data.split import Split
from towers.data.split_shards import SplitReader
from twotower.errors import PreparedDataError, TwoTowerError
from twotower.spark import shards
from twotower.storage import download_tree, exists, filesystem, is_url, local_staging, remove

log = logging.getLogger(__name__)

SETTING = "data.prepared"
TRAINED_ON = ("fit", "train")
PARTS = (shards.ENCODERS, shards.SAMPLES, shards.CATALOGUE, shards.SPLIT)


def _where(directory: str | Path) -> str:
    return f"{SETTING}={directory}"


def _read_text(location: str) -> str:
    if is_url(location):
        fs, path = filesystem(location)
        with fs.open(path, "r", encoding="utf-8") as handle:
            return handle.read()
    return Path(location).read_text(encoding="utf-8")


def read_prepared_manifest(directory: str | Path) -> dict[str, Any]:
    """The checked ``prepared.json`` of ``directory`` (a path or a URL): a
    :class:`PreparedDataError` naming the directory and the setting when it is not a
    complete prepared directory of this format."""
    root = str(directory).rstrip("/") or str(directory)
    manifest_path = f"{root}/{shards.MANIFEST}"
    if not exists(root):
        raise PreparedDataError(f"{_where(directory)}: no such directory")
    try:
        manifest = json.loads(_read_text(manifest_path))
    except FileNotFoundError as exc:
        raise PreparedDataError(
            f"{_where(directory)}: not a prepared directory (no {shards.MANIFEST}; "
            "write one with `twotower prepare --output DIR` or `twotower spark prepare`, "
            "which write it last)"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PreparedDataError(
            f"{_where(directory)}: cannot read {shards.MANIFEST}: {exc}"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != shards.PREPARED_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise PreparedDataError(
            f"{_where(directory)}: {shards.MANIFEST} has format {found!r}, this version "
            f"reads format {shards.PREPARED_FORMAT}"
        )
    if manifest.get("trained_on") not in TRAINED_ON:
        raise PreparedDataError(
            f"{_where(directory)}: {shards.MANIFEST} has trained_on "
            f"{manifest.get('trained_on')!r}, expected one of {list(TRAINED_ON)}"
        )
    missing = [part for part in PARTS if not exists(f"{root}/{part}")]
    if missing:
        raise PreparedDataError(f"{_where(directory)}: incomplete, missing {', '.join(missing)}")
    return manifest


def read_catalogue(directory: Path, item_table: bool = True, where: str = "") -> pd.DataFrame:
    """The catalogue: the item table in catalogue order (``item_row``, then dropped),
    validated as the single-machine reader validates an item table; without an item
    table (``item_table=False``), the bare item ids as that reader builds them."""
    table = pd.read_parquet(directory / shards.CATALOGUE)
    table = table.sort_values(shards.ITEM_ROW, kind="mergesort")
    if not np.array_equal(table[shards.ITEM_ROW].to_numpy(), np.arange(len(table))):
        raise PreparedDataError(f"{where}: {shards.CATALOGUE}/ item_row is not 0..n-1")
    table = table.drop(columns=[shards.ITEM_ROW])
    table = validate_entities(table, ITEM_ID, f"{where}/{shards.CATALOGUE}", "item")
    if not item_table:  # as towers.data.readers.load_tables builds it, dtypes included
        return pd.DataFrame({ITEM_ID: table[ITEM_ID].to_numpy()})
    return table


def read_split(
    directory: Path, catalogue: pd.DataFrame, cold_items: list[str], where: str = ""
) -> Split:
    """The :class:`Split` of ``split/`` as :func:`towers.data.split.make_split` returns it
    (each part in the events' order: user, time, item order, file order; train is fit
    plus validation in that order), without the timestamps and weights: read a file at
    a time as integer codes by :class:`towers.data.split_shards.SplitReader`, never as a table of
    every event nor as a string per row."""
    reader = SplitReader(directory / shards.SPLIT, catalogue[ITEM_ID].to_numpy(), where)
    return reader.read(cold_items)


def streamed_samples(stream: SampleStream, history_length: int) -> TrainingSamples:
    """The :class:`TrainingSamples` of samples left on disk: no arrays (each batch
    reads them from the shards), the sampled-softmax correction from their counts."""
    empty = np.zeros(0, dtype=np.int64)
    return TrainingSamples(
        user_inputs={},
        item_rows=empty,
        weights=np.zeros(0, dtype=np.float32),
        histories=HistorySource(empty, empty, empty, history_length),
        item_log_p=item_log_p_of_counts(stream.stats.item_counts),
    )


def load_prepared(
    directory: str | Path,
    users: pd.DataFrame | None,
    name: str = "prepared",
    stream: bool = False,
) -> PreparedData:
    """The :class:`PreparedData` of a prepared directory (a path, or a URL copied to a
    local temporary directory first), trained on what the directory was prepared on
    (``trained_on``: the fit part, or all of train), with ``users`` (the validated user
    table, or None) for the evaluation users' attributes; ``name`` names the data in
    ``info``. ``stream``: leave the training samples in ``samples/`` (read where they
    are, at the URL for a URL) for :class:`towers.data.shard_stream.ShardBatches`."""
    manifest = read_prepared_manifest(directory)
    if not is_url(str(directory)):
        return _load(Path(directory), manifest, users, name, str(directory), stream)
    staging = local_staging("twotower-prepared-")
    try:
        if stream:  # all but the samples, which are read where they are
            fs, root = filesystem(str(directory))
            for part in PARTS:
                if part == shards.ENCODERS:
                    fs.get_file(f"{root.rstrip('/')}/{part}", str(staging / part))
                elif part != shards.SAMPLES:
                    download_tree(f"{str(directory).rstrip('/')}/{part}", staging / part)
        else:
            download_tree(str(directory), staging)
        return _load(staging, manifest, users, name, str(directory), stream)
    finally:
        remove(staging)


def check_user_table(encoders: Any, users: pd.DataFrame | None, where: str) -> None:
    """Refuse a run whose user table lacks attribute columns the directory's encoders were
    fitted on: its evaluation users (and the bundle) would silently get unknown values."""
    user = encoders.users
    needed = [*user.categorical, *user.multi_hot, *user.numeric, *user.text]
    if not needed:
        return
    if users is None:
        raise PreparedDataError(
            f"{where}: prepared with user attributes {needed}: set data.users to the user "
            "table it was prepared with"
        )
    missing = [column for column in needed if column not in users.columns]
    if missing:
        raise PreparedDataError(
            f"{where}: the user table (data.users) has no column {missing}, which the "
            "directory's encoders were fitted on (check data.columns)"
        )


def _stream(directory: str, n_items: int, user_inputs: list[str], where: str) -> SampleStream:
    """The sample shards of ``directory`` (checked to hold what training reads) and their
    counts, to stream from."""
    sample_shards = SampleShards.open(
        f"{directory.rstrip('/')}/{shards.SAMPLES}", shards.sample_columns(user_inputs)
    )
    try:
        return SampleStream(sample_shards, SampleStats.scan(sample_shards, n_items))
    except PreparedDataError:
        raise
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
        raise PreparedDataError(f"{where}: cannot read {shards.SAMPLES}/ ({exc})") from exc


def _load(
    root: Path,
    manifest: dict[str, Any],
    users: pd.DataFrame | None,
    name: str,
    directory: str,
    stream: bool = False,
) -> PreparedData:
    where = _where(directory)
    fit_on = str(manifest["trained_on"])
    counts = manifest.get("counts", {})
    try:
        encoders = shards.read_encoders(root)
        check_user_table(encoders, users, where)
        item_table = (manifest.get("settings") or {}).get("items") is not None
        catalogue = read_catalogue(root, item_table, where)
        split = read_split(root, catalogue, list(manifest.get("cold_items", [])), where)
        read = None if stream else shards.read_samples(root, encoders)
    except PreparedDataError:
        raise
    except (OSError, KeyError, ValueError, pa.ArrowException, TwoTowerError) as exc:
        raise PreparedDataError(f"{where}: cannot read the directory ({exc})") from exc
    sample_stream: SampleStream | None = None
    if read is None:  # streamed: the shards' own checks name the file
        sample_stream = _stream(directory, len(catalogue), encoders.user_input_names, where)
        samples = streamed_samples(sample_stream, encoders.history_length)
        n_samples = sample_stream.n_samples
    else:
        samples = TrainingSamples(
            user_inputs=read.user_inputs,
            item_rows=read.item_rows,
            weights=read.weights,
            histories=read.histories,
            item_log_p=item_log_p(read.item_rows, len(catalogue)),
        )
        n_samples = len(read)
    expected = {
        "items": len(catalogue),
        "samples": n_samples,
        **{k: v for k, v in split.stats().items() if k in counts},
    }
    wrong = {k: (counts[k], v) for k, v in expected.items() if k in counts and counts[k] != v}
    if wrong:
        found = ", ".join(f"{k} {v} (prepared.json: {c})" for k, (c, v) in wrong.items())
        raise PreparedDataError(f"{where}: the files do not match {shards.MANIFEST}: {found}")
    rows = read.item_rows if read is not None else np.zeros(0, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(catalogue)):  # streamed: at scan
        raise PreparedDataError(f"{where}: {shards.SAMPLES}/ names item rows outside the catalogue")
    # what follows reads the user table and the split's parts, never every event again
    raw = RawData(split.test.iloc[:0], catalogue, users, name=name)
    fit = split.fit if fit_on == "fit" else split.train
    eval_sources = build_eval_sources(raw, split, fit, catalogue, encoders)
    data = assemble_prepared(raw, split, catalogue, encoders, samples, eval_sources, fit_on)
    data.info["prepared"] = directory
    data.sample_stream = sample_stream
    log.info(
        "prepared directory %s: %d samples (trained on %s), %d items",
        data.info["prepared"],
        data.n_samples,
        fit_on,
        data.n_items,
    )
    return data
