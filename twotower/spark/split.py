"""The EVALUATION.md split in Spark, as :mod:`towers.data.split` does it on one machine.

The same steps, in the same order, with the same results: the optional rating threshold;
each (user, item) pair kept once, at its earliest time; each user's events ordered by
(timestamp, item order) with file order breaking what is left; the per-user temporal
hold-out (``max(1, round(fraction * n))`` of users with at least ``min_interactions``
events, rounded by numpy on the driver for every distinct ``n``); validation carved from
train the same way; or the cold-item variant, whose random item draw runs on the driver
with numpy over the sorted item ids, as the single-machine code draws it.

Each event gets a ``part``: ``fit``, ``validation`` or ``test`` (train is fit plus
validation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from towers.data.schema import ITEM_ID, RATING, TIMESTAMP, USER_ID
from twotower.errors import EmptyTableError
from twotower.spark.frames import ROW, bad_rows, persist

log = logging.getLogger(__name__)

ITEM_ORDER = "_twotower_item_order"  # the tie-break key: item ids as integers or strings
PART = "part"
FIT, VALIDATION, TEST = "fit", "validation", "test"
PARTS = (FIT, VALIDATION, TEST)
INTEGER_ID = r"^[+-]?[0-9]+$"


def event_order() -> list[Column]:
    """The events' total order: user, time, item order, then file order (the stable sort
    of the single-machine code keeps file order among equal keys)."""
    return [F.col(USER_ID), F.col(TIMESTAMP), F.col(ITEM_ORDER), F.col(ROW)]


def prepare_interactions(events: DataFrame, min_rating: float | None = None) -> DataFrame:
    """Implicit positives, as :func:`towers.data.split.prepare_interactions`: the optional
    rating threshold, the item-order key, and each (user, item) pair kept once, at its
    earliest time (file order among equal times). Cached."""
    if min_rating is not None:
        if RATING not in events.columns:
            raise EmptyTableError("min_rating is set but the interactions have no 'rating' column")
        events = events.filter(F.col(RATING) >= F.lit(float(min_rating)))
    found = bad_rows(events, {"rows": F.lit(True), "text": ~F.col(ITEM_ID).rlike(INTEGER_ID)})
    if not found["rows"][0]:
        raise EmptyTableError("no interactions left after the rating threshold")
    integers = not found["text"][0]
    key = F.col(ITEM_ID).cast(T.DecimalType(38, 0)) if integers else F.col(ITEM_ID)
    events = events.withColumn(ITEM_ORDER, key)
    earliest = Window.partitionBy(USER_ID, ITEM_ID).orderBy(TIMESTAMP, ROW)
    kept = persist(
        events.withColumn("_first", F.row_number().over(earliest) == 1)
        .filter("_first")
        .drop("_first")
    )
    return kept


def held_counts(sizes: list[int], fraction: float, min_interactions: int) -> list[int]:
    """How many of a user's ``n`` events are held out, for each ``n`` of ``sizes``: numpy's
    rounding, exactly as :func:`towers.data.split.temporal_holdout`."""
    n = np.asarray(sizes, dtype=np.int64)
    held = np.where(n >= min_interactions, np.maximum(1, np.round(fraction * n)), 0)
    return [int(h) for h in held]


def temporal_parts(
    events: DataFrame, test_fraction: float, validation_fraction: float, min_interactions: int
) -> DataFrame:
    """``events`` with :data:`PART`: each user's last events are ``test``, the last of the
    rest ``validation`` (both by the temporal rule), the others ``fit``."""
    spark = events.sparkSession
    by_user = Window.partitionBy(USER_ID)
    ordered = by_user.orderBy(TIMESTAMP, ITEM_ORDER, ROW)
    ranked = events.withColumn("_n", F.count(F.lit(1)).over(by_user)).withColumn(
        "_rank", F.row_number().over(ordered) - 1
    )
    sizes = sorted(int(r[0]) for r in ranked.select("_n").distinct().collect())
    test_held = held_counts(sizes, test_fraction, min_interactions)
    train_sizes = [n - h for n, h in zip(sizes, test_held, strict=True)]
    validation_held = held_counts(train_sizes, validation_fraction, min_interactions)
    table = spark.createDataFrame(
        list(zip(sizes, train_sizes, validation_held, strict=True)),
        "_n long, _train long, _validation long",
    )
    part = (
        F.when(F.col("_rank") >= F.col("_train"), F.lit(TEST))
        .when(F.col("_rank") >= F.col("_train") - F.col("_validation"), F.lit(VALIDATION))
        .otherwise(F.lit(FIT))
    )
    return (
        ranked.join(F.broadcast(table), "_n")
        .withColumn(PART, part)
        .drop("_n", "_rank", "_train", "_validation")
    )


def draw_cold_items(item_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """The held-out items, drawn as :func:`towers.data.split.cold_item_holdout` draws them:
    ``round(fraction * n)`` of the sorted ids, with numpy's generator seeded ``seed``."""
    items = np.sort(np.asarray(item_ids, dtype=object).astype(str))
    n_cold = round(fraction * len(items))
    return np.sort(np.random.default_rng(seed).choice(items, size=n_cold, replace=False))


def _mark(events: DataFrame, cold: np.ndarray, name: str) -> DataFrame:
    spark = events.sparkSession
    table = spark.createDataFrame([(str(i),) for i in cold], f"{ITEM_ID} string").withColumn(
        name, F.lit(True)
    )
    return events.join(F.broadcast(table), ITEM_ID, "left").fillna({name: False})


def _distinct_items(events: DataFrame) -> list[str]:
    return [r[0] for r in events.select(ITEM_ID).distinct().collect()]


def cold_parts(events: DataFrame, cold_fraction: float, seed: int) -> tuple[DataFrame, np.ndarray]:
    """``events`` with :data:`PART` in the cold-item variant: every event of a drawn item is
    ``test``; of the rest, every event of an item drawn again (seed + 1) among train's
    items is ``validation``. Also returns the test's held-out item ids. The draws run on
    the driver over the distinct item ids (one string per item, as the bundle holds)."""
    cold = draw_cold_items(_distinct_items(events), cold_fraction, seed)
    marked = persist(_mark(events, cold, "_cold"))
    train = marked.filter(~F.col("_cold"))
    cold_validation = draw_cold_items(_distinct_items(train), cold_fraction, seed + 1)
    marked = _mark(marked, cold_validation, "_cold_validation")
    part = (
        F.when(F.col("_cold"), F.lit(TEST))
        .when(F.col("_cold_validation"), F.lit(VALIDATION))
        .otherwise(F.lit(FIT))
    )
    return marked.withColumn(PART, part).drop("_cold", "_cold_validation"), cold


@dataclass
class SparkSplit:
    """The split: every prepared event with its :data:`PART`, and the cold items."""

    events: DataFrame
    cold_items: np.ndarray
    counts: dict[str, int]

    def part(self, *names: str) -> DataFrame:
        """The events of the named parts (``"fit"``, ``"validation"``, ``"test"``)."""
        return self.events.filter(F.col(PART).isin(list(names)))

    def stats(self) -> dict[str, int]:
        """Rows and users of each part, as :meth:`towers.data.split.Split.stats`."""
        return {**self.counts, "cold_items": len(self.cold_items)}


def make_split(
    events: DataFrame,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.1,
    min_interactions: int = 5,
    cold_items: bool = False,
    cold_fraction: float = 0.1,
    seed: int = 42,
) -> SparkSplit:
    """The split of :func:`towers.data.split.make_split`, on ``events`` from
    :func:`prepare_interactions`; an empty part is an error."""
    if cold_items:
        parted, cold = cold_parts(events, cold_fraction, seed)
    else:
        parted = temporal_parts(events, test_fraction, validation_fraction, min_interactions)
        cold = np.array([], dtype=object)
    parted = persist(parted)
    found = {
        r[PART]: (int(r["rows"]), int(r["users"]))
        for r in parted.groupBy(PART)
        .agg(F.count(F.lit(1)).alias("rows"), F.countDistinct(USER_ID).alias("users"))
        .collect()
    }
    rows = {name: found.get(name, (0, 0))[0] for name in PARTS}
    counts = {
        "train": rows[FIT] + rows[VALIDATION],
        FIT: rows[FIT],
        VALIDATION: rows[VALIDATION],
        TEST: rows[TEST],
        "test_users": found.get(TEST, (0, 0))[1],
        "validation_users": found.get(VALIDATION, (0, 0))[1],
    }
    for name in ("train", TEST, VALIDATION):
        if not counts[name]:
            raise EmptyTableError(f"the {name} split is empty: too few interactions per user")
    log.info("split %s", counts)
    return SparkSplit(parted, cold, counts)
