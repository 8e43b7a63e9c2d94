"""DataFrame helpers shared by the jobs: contiguous row positions and row checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

ROW = "_twotower_row"  # a key that orders a table's rows as in its files (see with_file_order)
_MID = "_twotower_mid"
_PART = "_twotower_part"
_OFFSET = "_twotower_offset"
PARTITION_BITS = 33  # monotonically_increasing_id: partition index << 33 | row in partition


_PERSISTED: list[DataFrame] = []  # what the running job cached (see release)


def persist(df: DataFrame) -> DataFrame:
    """``df`` cached in memory, spilling to disk (it is read by several later steps);
    :func:`release` drops it when the job ends."""
    cached = df.persist(StorageLevel.MEMORY_AND_DISK)
    _PERSISTED.append(cached)
    return cached


def release() -> None:
    """Drop every DataFrame :func:`persist` cached (a job calls it when it ends)."""
    while _PERSISTED:
        _PERSISTED.pop().unpersist()


def with_positions(df: DataFrame, name: str, order: Sequence[str | Column] = ()) -> DataFrame:
    """``df`` plus ``name``: each row's 0-based position, without gaps, in ``order`` (the
    rows' current order when empty), computed in the cluster: the rows are numbered
    within their partitions, each partition's row count is collected (one number per
    partition) and the offsets are joined back. ``order`` must be a total order (no ties),
    so that the numbering is the same each time it is computed."""
    ordered = df.orderBy(*order) if order else df
    tagged = persist(ordered.withColumn(_MID, F.monotonically_increasing_id()))
    partition = F.shiftright(F.col(_MID), PARTITION_BITS)
    counts = sorted((int(r[0]), int(r[1])) for r in tagged.groupBy(partition).count().collect())
    offsets, total = [], 0
    for index, count in counts:
        offsets.append((index, total))
        total += count
    spark = df.sparkSession
    table = spark.createDataFrame(offsets, f"{_PART} long, {_OFFSET} long")
    local = F.col(_MID) - F.shiftleft(F.col(_PART), PARTITION_BITS)
    return (
        tagged.withColumn(_PART, partition)
        .join(F.broadcast(table), _PART)
        .withColumn(name, F.col(_OFFSET) + local)
        .drop(_MID, _PART, _OFFSET)
    )


def with_file_order(df: DataFrame) -> DataFrame:
    """``df`` (straight from a reader) plus :data:`ROW`, a key that orders the rows as they
    are in the files: the files in name order, each file's rows in their order. One file
    needs no work (a file's rows come partition by partition, in order: the key is
    ``monotonically_increasing_id``); several files are sorted by (file name, row) and
    numbered. :func:`row_number` turns a key into the row's position, for messages."""
    if len(df.inputFiles()) <= 1:
        return df.withColumn(ROW, F.monotonically_increasing_id())
    scanned = df.withColumn("_twotower_file", F.input_file_name()).withColumn(
        "_twotower_in_file", F.monotonically_increasing_id()
    )
    return with_positions(scanned, ROW, ["_twotower_file", "_twotower_in_file"]).drop(
        "_twotower_file", "_twotower_in_file"
    )


def row_number(df: DataFrame, key: int) -> int:
    """The 0-based position in file order of the row whose :data:`ROW` is ``key`` (a
    count of the rows before it: for error messages only)."""
    return df.filter(F.col(ROW) < key).count()


def bad_rows(df: DataFrame, checks: Mapping[str, Column]) -> dict[str, tuple[int, int | None]]:
    """For each named condition: how many rows of ``df`` meet it and the :data:`ROW` key
    of the first such row, all in one pass."""
    if not checks:
        return {}
    aggregates = []
    for i, condition in enumerate(checks.values()):
        bad = F.coalesce(condition, F.lit(False))
        aggregates += [
            F.sum(bad.cast("long")).alias(f"n{i}"),
            F.min(F.when(bad, F.col(ROW))).alias(f"r{i}"),
        ]
    found = df.agg(*aggregates).first()
    assert found is not None
    return {name: (int(found[f"n{i}"] or 0), found[f"r{i}"]) for i, name in enumerate(checks)}


def value_at(df: DataFrame, key: int, column: str) -> object:
    """The value of ``column`` in the row whose :data:`ROW` is ``key`` (for messages)."""
    found = df.filter(F.col(ROW) == key).select(column).first()
    return None if found is None else found[0]
