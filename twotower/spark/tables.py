"""Reading and validating the input tables in Spark, as :mod:`towers.data.readers` and
:mod:`towers.data.schema` do on one machine.

Tables are Parquet or CSV (a file or a directory of part files), at a local path or any
URL Spark reads (``hdfs://``, ``s3a://``, ...). Every validated table carries
:data:`~twotower.spark.frames.ROW`, a key of the rows' file order: the order the
single-machine reader sees (it decides ties, the catalogue order and, without a
``timestamp`` column, the time order). Error messages name rows by their 0-based
position in that order, as the single-machine messages do.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.utils import AnalysisException

from towers.data.schema import (
    ITEM_ID,
    MAPPABLE_COLUMNS,
    RATING,
    TIMESTAMP,
    UNKNOWN_ITEM_POLICIES,
    USER_ID,
    WEIGHT,
)
from twotower.encoding.vocabulary import as_str_or_none
from twotower.errors import (
    DataValidationError,
    DuplicateIdError,
    EmptyTableError,
    InvalidValueError,
    MissingColumnError,
    MissingFileError,
    UnknownIdError,
)
from twotower.spark.frames import (
    ROW,
    bad_rows,
    persist,
    row_number,
    value_at,
    with_file_order,
    with_positions,
)
from twotower.spark.settings import is_local, local_path

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv", "tsv")
INTEGRAL_TYPES = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
FRACTIONAL_TYPES = (T.FloatType, T.DoubleType)
TIME_TYPES = (T.TimestampType, T.TimestampNTZType, T.DateType)


def table_format(path: str, fmt: str | None = None) -> str:
    """``parquet``, ``csv`` or ``tsv``: ``fmt`` when given, else from the file suffix (a
    directory without one is Parquet, as Spark writes)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataValidationError(f"{path}: unknown table format {fmt!r} (use {FORMATS})")
        return fmt
    suffix = Path(urlparse(path).path.rstrip("/")).suffix.lower()
    if suffix in (".parquet", ".pq", ""):
        return "parquet"
    if suffix in (".csv", ".txt"):
        return "csv"
    if suffix == ".tsv":
        return "tsv"
    raise DataValidationError(
        f"{path}: unknown table format '{suffix}' (use .csv, .tsv or .parquet, or --format)"
    )


def read_table(
    spark: SparkSession,
    path: str,
    fmt: str | None = None,
    string_columns: tuple[str, ...] = (),
) -> DataFrame:
    """A table as a DataFrame, with :data:`ROW` (file order). CSV files have a header;
    their column types are inferred, except ``string_columns`` (the ids), read as text as
    the single-machine reader does (so ``007`` stays ``007``)."""
    kind = table_format(path, fmt)
    if is_local(path) and not local_path(path).exists():
        raise MissingFileError(f"{path}: no such file or directory")
    try:
        if kind == "parquet":
            table = spark.read.parquet(path)
        else:
            options = {"header": "true", "sep": "\t" if kind == "tsv" else ","}
            inferred = spark.read.options(inferSchema="true", **options).csv(path).schema
            schema = T.StructType(
                [
                    T.StructField(f.name, T.StringType(), True) if f.name in string_columns else f
                    for f in inferred.fields
                ]
            )
            table = spark.read.schema(schema).options(**options).csv(path)
    except AnalysisException as exc:
        if "PATH_NOT_FOUND" in str(exc) or "Path does not exist" in str(exc):
            raise MissingFileError(f"{path}: no such file or directory") from exc
        raise DataValidationError(f"{path}: cannot be read as a {kind} table: {exc}") from exc
    return with_file_order(table)


def rename_columns(table: DataFrame, columns: Mapping[str, str], source: str) -> DataFrame:
    """Rename the table's own column names to twotower's (``{"user_id": "customer_id"}``),
    as :func:`towers.data.schema.rename_columns` does."""
    unknown = sorted(set(columns) - set(MAPPABLE_COLUMNS))
    if unknown:
        raise MissingColumnError(
            f"{source}: cannot map {unknown}; --column maps {list(MAPPABLE_COLUMNS)}"
        )
    for ours, theirs in columns.items():
        if theirs not in table.columns or ours == theirs:
            continue
        if ours in table.columns:
            raise DuplicateIdError(
                f"{source}: has both its own '{ours}' column and one mapped onto it"
            )
        table = table.withColumnRenamed(theirs, ours)
    return table


def _require_columns(table: DataFrame, columns: list[str], source: str, what: str) -> None:
    for column in columns:
        if column not in table.columns:
            shown = ", ".join(c for c in table.columns if c != ROW)
            raise MissingColumnError(
                f"{source}: {what} table has no column '{column}' (columns: {shown})"
            )


def _missing(table: DataFrame, name: str) -> Column:
    column = F.col(name)
    if isinstance(table.schema[name].dataType, FRACTIONAL_TYPES):
        return column.isNull() | F.isnan(column)
    return column.isNull()


@F.pandas_udf(T.StringType())  # type: ignore[call-overload]
def _pandas_strings(values: pd.Series) -> pd.Series:
    """Values as the single-machine code writes them as strings (``as_str_or_none``)."""
    return as_str_or_none(values)


def as_strings(table: DataFrame, name: str) -> Column:
    """Column ``name`` as strings, written as pandas writes the same values
    (``astype(str)``): integers as digits, booleans as ``True``/``False``, floats by the
    pandas code itself; missing values stay null."""
    column = F.col(name)
    kind = table.schema[name].dataType
    if isinstance(kind, T.StringType):
        return column
    if isinstance(kind, INTEGRAL_TYPES):
        return column.cast("string")
    if isinstance(kind, T.BooleanType):
        return F.when(column, F.lit("True")).when(~column, F.lit("False"))
    return _pandas_strings(column)


def _id_checks(table: DataFrame, name: str) -> dict[str, Column]:
    checks = {f"{name} missing": _missing(table, name)}
    if isinstance(table.schema[name].dataType, FRACTIONAL_TYPES):
        checks[f"{name} fraction"] = F.col(name) % 1 != 0
    return checks


def _normalised_id(
    table: DataFrame, name: str, found: dict[str, tuple[int, int | None]], source: str
) -> Column:
    """Ids as strings (integral floats lose their ``.0``); a missing id is an error naming
    the column and its first row, as :func:`towers.data.schema.normalise_ids`."""
    count, key = found[f"{name} missing"]
    if count:
        raise InvalidValueError(
            f"{source}: column '{name}' has a missing value at row {row_number(table, key)} "
            f"({count} missing in all)"
        )
    if f"{name} fraction" in found and not found[f"{name} fraction"][0]:
        return F.col(name).cast("long").cast("string")
    return as_strings(table, name)


def _check_rows(found: dict[str, tuple[int, int | None]], source: str, what: str) -> None:
    if not found["rows"][0]:
        raise EmptyTableError(f"{source}: the {what} table is empty")


def _seconds(table: DataFrame, source: str) -> tuple[Column, Column | None]:
    """The ``timestamp`` column as float seconds, and, for a text column, the condition
    "not a number" (such a column holds date-time strings)."""
    column = F.col(TIMESTAMP)
    kind = table.schema[TIMESTAMP].dataType
    if isinstance(kind, T.BooleanType):
        raise InvalidValueError(f"{source}: column '{TIMESTAMP}' holds booleans, not times")
    if isinstance(kind, TIME_TYPES):
        return F.unix_micros(column.cast("timestamp")) / F.lit(1e6), None
    if isinstance(kind, T.StringType):
        return column.cast("double"), column.cast("double").isNull()
    if isinstance(kind, T.NumericType):
        return column.cast("double"), None
    raise InvalidValueError(
        f"{source}: column '{TIMESTAMP}' has type {kind.simpleString()}, not a time"
    )


def _not_number(table: DataFrame, name: str) -> Column:
    value = F.col(name).cast("double")
    return value.isNull() | F.isnan(value)


def validate_interactions(table: DataFrame, source: str) -> DataFrame:
    """Check and normalise an interactions table, as
    :func:`towers.data.schema.validate_interactions`: string ids, float ``timestamp``
    seconds (times and date-time strings converted, UTC unless they say otherwise; the
    file order when there is no such column, with a warning), numeric ``weight`` (finite,
    not negative, not all zero) and ``rating``. Every check names the column and its first
    bad row. Returns ``user_id``, ``item_id``, ``timestamp``, ``weight`` / ``rating`` when
    present and :data:`ROW`, cached. Two passes over the table."""
    _require_columns(table, [USER_ID, ITEM_ID], source, "interactions")
    checks = {"rows": F.lit(True), **_id_checks(table, USER_ID), **_id_checks(table, ITEM_ID)}
    seconds, text_time = None, None
    if TIMESTAMP in table.columns:
        seconds, text_time = _seconds(table, source)
        if text_time is not None:
            checks["text time"] = text_time
    numbers = [c for c in (WEIGHT, RATING) if c in table.columns]
    for name in numbers:
        checks[f"{name} not a number"] = _not_number(table, name)
    found = bad_rows(table, checks)
    _check_rows(found, source, "interactions")
    columns = {
        USER_ID: _normalised_id(table, USER_ID, found, source),
        ITEM_ID: _normalised_id(table, ITEM_ID, found, source),
    }
    for name in numbers:
        count, key = found[f"{name} not a number"]
        if count:
            raise InvalidValueError(
                f"{source}: column '{name}' is not a number at row {row_number(table, key)} "
                f"(value {value_at(table, key, name)!r})"
            )
        columns[name] = F.col(name).cast("double")
    if seconds is None:
        log.warning(
            "%s: no '%s' column; taking the file order as the time order (each user's "
            "last rows become their test events)",
            source,
            TIMESTAMP,
        )
        table = with_positions(table, "_twotower_position", [ROW])
        seconds = F.col("_twotower_position").cast("double")
    elif text_time is not None and found["text time"][0]:
        seconds = F.unix_micros(F.to_timestamp(F.col(TIMESTAMP))) / F.lit(1e6)
    columns[TIMESTAMP] = seconds.cast("double")
    out = table.select(*[c.alias(n) for n, c in columns.items()], ROW)
    time = F.col(TIMESTAMP)
    checks = {"time": time.isNull() | F.isnan(time) | (F.abs(time) == float("inf"))}
    if WEIGHT in numbers:
        weight = F.col(WEIGHT)
        checks["not finite"] = F.isnan(weight) | (F.abs(weight) == float("inf"))
        checks["negative"] = weight < 0
        checks["positive"] = weight > 0
    found = bad_rows(out, checks)
    count, key = found["time"]
    if count:
        raise InvalidValueError(
            f"{source}: column '{TIMESTAMP}' cannot be parsed as a time at row "
            f"{row_number(table, key)} (value {value_at(table, key, TIMESTAMP)!r})"
        )
    if WEIGHT in numbers:
        for what in ("not finite", "negative"):
            count, key = found[what]
            if count:
                raise InvalidValueError(
                    f"{source}: column '{WEIGHT}' is {what} at row {row_number(out, key)} "
                    f"(value {value_at(out, key, WEIGHT)!r})"
                )
        if not found["positive"][0]:
            raise InvalidValueError(f"{source}: column '{WEIGHT}' is zero on every row")
    order = [c for c in (USER_ID, ITEM_ID, TIMESTAMP, WEIGHT, RATING, ROW) if c in out.columns]
    return persist(out.select(*order))


def string_ids(table: DataFrame, id_column: str, source: str, what: str) -> DataFrame:
    """``table`` with its id column checked (present, no missing value, the table not
    empty; errors name the file, the column and the first bad row) and as strings."""
    _require_columns(table, [id_column], source, what)
    found = bad_rows(table, {"rows": F.lit(True), **_id_checks(table, id_column)})
    _check_rows(found, source, what)
    return table.withColumn(id_column, _normalised_id(table, id_column, found, source))


def validate_entities(table: DataFrame, id_column: str, source: str, what: str) -> DataFrame:
    """Check an item or user table as :func:`towers.data.schema.validate_entities`: the id
    column present, no missing or duplicate ids (the error names the first duplicated id
    and its rows). Cached."""
    out = persist(string_ids(table, id_column, source, what))
    duplicated = (
        out.groupBy(id_column)
        .agg(F.count(F.lit(1)).alias("n"), F.min(ROW).alias("first"))
        .filter(F.col("n") > 1)
    )
    first = duplicated.orderBy("first").first()
    if first is not None:
        dup_id = first[id_column]
        keys = sorted(r[0] for r in out.filter(F.col(id_column) == dup_id).select(ROW).collect())
        rows = [row_number(out, key) for key in keys[:10]]
        raise DuplicateIdError(
            f"{source}: duplicate {id_column} '{dup_id}' at rows {rows} "
            f"({duplicated.count()} duplicated ids in all)"
        )
    return out


def check_known_items(events: DataFrame, items: DataFrame, policy: str, source: str) -> DataFrame:
    """Interactions whose item is not in the item table: an error naming the first few, or
    (``policy="drop"``) dropped with a warning, as
    :func:`towers.data.schema.check_known_items`."""
    if policy not in UNKNOWN_ITEM_POLICIES:
        raise ValueError(f"unknown_items must be one of {UNKNOWN_ITEM_POLICIES}, got {policy!r}")
    known_ids = items.select(ITEM_ID)
    unknown = events.join(known_ids, ITEM_ID, "left_anti")
    found = unknown.agg(F.count(F.lit(1)).alias("n"), F.min(ROW).alias("row")).first()
    assert found is not None
    if not found["n"]:
        return events
    first_ids = [
        r[0]
        for r in unknown.groupBy(ITEM_ID)
        .agg(F.min(ROW).alias("first"))
        .orderBy("first")
        .limit(5)
        .collect()
    ]
    if policy == "error":
        raise UnknownIdError(
            f"{source}: {found['n']} interaction(s) name items missing from the item "
            f"table, first at row {row_number(events, found['row'])}: item_id {first_ids}"
            " (use --unknown-items drop to drop them)"
        )
    log.warning(
        "%s: dropped %d interaction(s) with item ids missing from the item table (first %s)",
        source,
        found["n"],
        first_ids,
    )
    kept = persist(events.join(known_ids, ITEM_ID, "left_semi"))
    if kept.isEmpty():
        raise EmptyTableError(
            f"{source}: the interactions (after dropping unknown items) table is empty"
        )
    return kept
