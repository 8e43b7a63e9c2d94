"""Read the three input tables from CSV, Parquet or pandas DataFrames, and validate them.

A table is a DataFrame, a file (.csv, .tsv, .parquet), or a **dataset**: a directory of
Parquet (or CSV) shards, hive partitions included, read with ``pyarrow.dataset``. Each
may be local or any fsspec URL (``s3://``, ``gs://``, ``file://``): see docs/storage.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from towers.data.ids import distinct_in_order
from towers.data.schema import (
    ITEM_ID,
    USER_ID,
    RawData,
    check_known_items,
    rename_columns,
    validate_entities,
    validate_interactions,
)
from twotower.encoding import FeatureColumns
from twotower.errors import DataValidationError, MissingFileError
from twotower.storage import arrow_filesystem, is_url

TableSource = str | Path | pd.DataFrame
ID_COLUMNS = {USER_ID: str, ITEM_ID: str}


def _dataset_format(files: list[str], where: str) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    if suffixes <= {".parquet", ".pq", ""}:
        return "parquet"
    if suffixes <= {".csv"}:
        return "csv"
    raise DataValidationError(
        f"{where}: a dataset must hold only .parquet or only .csv files, found {sorted(suffixes)}"
    )


def _as_dictionary(batch: Any, id_columns: Sequence[str]) -> Any:
    """``batch`` with its id columns dictionary-encoded (integer codes plus the batch's
    distinct values), so that no string array of every row is ever held."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arrays = [
        pc.dictionary_encode(column)
        if name in id_columns and not pa.types.is_dictionary(column.type)
        else column
        for name, column in zip(batch.schema.names, batch.columns, strict=True)
    ]
    fields = [
        field.with_type(array.type) for field, array in zip(batch.schema, arrays, strict=True)
    ]
    # the schema's metadata (pandas' index and dtypes) is kept for to_pandas
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, batch.schema.metadata))


def read_dataset(location: str, id_columns: Sequence[str] = ()) -> pd.DataFrame:
    """One table from a Parquet or CSV file or a directory of shards (hive partitions
    become columns), local or at an fsspec URL, read with ``pyarrow.dataset`` batch by
    batch. ``id_columns`` are dictionary-encoded batch by batch and come back as pandas
    Categoricals: memory for a code per row, not a string per row."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    filesystem, path = arrow_filesystem(location) if is_url(location) else (None, location)
    try:
        single = (filesystem or pafs.LocalFileSystem()).get_file_info(path).type == (
            pafs.FileType.File
        )
        # a folder's key=value subfolders are columns (hive partitions); a file's are not
        partitioning = None if single else "hive"
        probe = ds.dataset(path, filesystem=filesystem, partitioning=partitioning)
        files = [  # a file named itself is read whatever its name; a folder's _ and . are not
            f for f in probe.files if single or not Path(f).name.startswith(("_", "."))
        ]
        if not files:
            raise DataValidationError(f"{location}: no data files in the dataset")
        fmt = _dataset_format(files, location)
        file_format: str | ds.FileFormat = fmt
        if fmt == "csv":
            types = {column: pa.string() for column in ID_COLUMNS}
            file_format = ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types=types))
        dataset = ds.dataset(
            files, filesystem=filesystem, format=file_format, partitioning=partitioning
        )
        if id_columns:
            batches = [_as_dictionary(b, id_columns) for b in dataset.to_batches()]
            if not batches:
                return dataset.schema.empty_table().to_pandas()
            table = pa.Table.from_batches(batches).unify_dictionaries()
            del batches
        else:
            table = dataset.to_table()
    except FileNotFoundError as exc:
        raise MissingFileError(f"{location}: no such file or directory") from exc
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:  # e.g. list ids
        raise DataValidationError(f"{location}: cannot be read as a dataset: {exc}") from exc
    frame = table.to_pandas(self_destruct=True)
    del table
    release_arrow_memory()
    return frame


def release_arrow_memory() -> None:
    """Give back what Arrow's allocator keeps for reuse after a read: the batches, the
    tables and the string work of validation (pandas' strings are Arrow's), which the
    numpy work after a read never reuses (2 GB after reading 100M events). Objects in
    reference cycles that hold Arrow memory are collected first."""
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()


def read_table(source: TableSource, id_columns: Sequence[str] = ()) -> tuple[pd.DataFrame, str]:
    """A DataFrame and a name for messages, from a DataFrame, a .csv/.tsv/.parquet file or
    a directory of shards, local or at an fsspec URL. Parquet and shards are read batch
    by batch with ``id_columns`` as integer codes (see :func:`read_dataset`)."""
    if isinstance(source, pd.DataFrame):
        return source, "DataFrame"
    if is_url(source):
        return read_dataset(str(source), id_columns), str(source)
    path = Path(source)
    if path.is_dir() or (id_columns and path.suffix.lower() in (".parquet", ".pq")):
        if not path.exists():
            raise MissingFileError(f"{path}: no such file or directory")
        return read_dataset(str(path), id_columns), str(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path), str(path)
        if suffix in (".csv", ".tsv", ".txt"):
            sep = "\t" if suffix == ".tsv" else ","
            return pd.read_csv(path, sep=sep, dtype=ID_COLUMNS), str(path)
    except (ValueError, OSError) as exc:
        raise DataValidationError(f"{path}: cannot be read as a table: {exc}") from exc
    raise DataValidationError(
        f"{path}: unknown table format '{suffix}' (use .csv, .tsv or .parquet)"
    )


def load_tables(
    interactions: TableSource,
    items: TableSource | None = None,
    users: TableSource | None = None,
    *,
    unknown_items: str = "error",
    item_features: FeatureColumns | None = None,
    user_features: FeatureColumns | None = None,
    name: str = "csv",
    columns: Mapping[str, str] | None = None,
) -> RawData:
    """Read and validate interactions (+ optional item and user tables) into :class:`RawData`.

    Without an item table the catalogue is the set of items seen in the interactions,
    with no attributes. ``columns`` maps twotower's column names to the tables' own
    (``{"user_id": "customer_id", "timestamp": "ts"}``), applied to every table.
    """
    columns = dict(columns or {})
    id_columns = [columns.get(USER_ID, USER_ID), columns.get(ITEM_ID, ITEM_ID)]
    raw_events, events_source = read_table(interactions, id_columns)
    raw_events = rename_columns(raw_events, columns, events_source)
    events = validate_interactions(raw_events, events_source)
    del raw_events  # its Arrow memory is given back below
    if items is None:
        item_table = pd.DataFrame({ITEM_ID: distinct_in_order(events[ITEM_ID])})
    else:
        raw_items, items_source = read_table(items)
        raw_items = rename_columns(raw_items, columns, items_source)
        item_table = validate_entities(raw_items, ITEM_ID, items_source, "item")
        del raw_items
        events = check_known_items(events, item_table, unknown_items, events_source)
    user_table = None if users is None else load_user_table(users, columns)
    release_arrow_memory()
    return RawData(events, item_table, user_table, item_features, user_features, name)


def load_user_table(users: TableSource, columns: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read and validate the user table alone, as :func:`load_tables` does (``columns``:
    the same renaming)."""
    raw_users, users_source = read_table(users)
    raw_users = rename_columns(raw_users, dict(columns or {}), users_source)
    table = validate_entities(raw_users, USER_ID, users_source, "user")
    del raw_users
    release_arrow_memory()
    return table
