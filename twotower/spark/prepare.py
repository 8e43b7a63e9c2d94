"""``twotower spark prepare``: the training data of one experiment, prepared in Spark.

Reads the interactions (and the optional item and user tables), applies the EVALUATION.md
split exactly as :func:`towers.data.split.make_split` does, fits the feature encoders as
:func:`towers.data.prepare.fit_encoders` does, and writes (see :mod:`twotower.spark.shards`
and ``docs/spark.md``):

- ``encoders.json``: the encoders, in the bundle's own format;
- ``samples/``: Parquet shards, one row per training event of the fit part (``fit_on=
  "train"``: of all of train) in sample order, integer codes only;
- ``catalogue/``: the item table in catalogue order (``item_row``);
- ``split/``: every prepared event with its part (``fit``, ``validation``, ``test``), for
  the evaluation sets;
- ``prepared.json``: the settings, the counts and the layout.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from towers.data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT
from twotower.encoding import PAD_INDEX, FeatureEncoders
from twotower.spark import shards
from twotower.spark.encoders import VALUE, fit_entity, infer_feature_columns
from twotower.spark.frames import ROW, persist, release, with_positions
from twotower.spark.settings import PrepareResult, PrepareSettings, settings_dict
from twotower.spark.split import FIT, PART, VALIDATION, event_order, make_split
from twotower.spark.split import prepare_interactions as prepare_events
from twotower.spark.storage import check_output, join, prepare_output, write_text
from twotower.spark.tables import (
    check_known_items,
    is_local,
    read_table,
    rename_columns,
    validate_entities,
    validate_interactions,
)

log = logging.getLogger(__name__)


@dataclass
class Tables:
    """The validated input tables (each with :data:`ROW`) and the catalogue."""

    events: DataFrame
    items: DataFrame | None
    users: DataFrame | None
    catalogue: DataFrame  # item_id, item_row (+ the item table's columns)


def read_inputs(spark: SparkSession, settings: PrepareSettings) -> Tables:
    """Read and validate the tables as :func:`towers.data.readers.load_tables` does; the
    catalogue is the item table in its order, or without one the interactions' items in
    order of first appearance."""
    ids = (settings.columns.get(USER_ID, USER_ID), settings.columns.get(ITEM_ID, ITEM_ID))

    def load(path: str) -> DataFrame:
        return rename_columns(
            read_table(spark, path, settings.format, string_columns=ids), settings.columns, path
        )

    events = validate_interactions(load(settings.interactions), settings.interactions)
    items = users = None
    if settings.items is None:
        first = events.groupBy(ITEM_ID).agg(F.min(ROW).alias("_first"))
        catalogue = with_positions(first, shards.ITEM_ROW, ["_first"]).drop("_first")
    else:
        items = validate_entities(load(settings.items), ITEM_ID, settings.items, "item")
        events = check_known_items(events, items, settings.unknown_items, settings.interactions)
        catalogue = with_positions(items, shards.ITEM_ROW, [ROW]).drop(ROW)
    if settings.users is not None:
        users = validate_entities(load(settings.users), USER_ID, settings.users, "user")
    return Tables(events, items, users, persist(catalogue))


def history_windows(samples: DataFrame, length: int) -> DataFrame:
    """``samples`` plus ``history``: the item codes of the user's last ``length`` events
    strictly before the sample's time, oldest first, left-padded with ``PAD_INDEX``, as
    :func:`towers.data.samples.history_windows` over ``history_bounds``. Each run of a
    user's events at one time takes the window of its first event."""
    empty = F.array().cast(T.ArrayType(T.LongType()))
    if length == 0:
        return samples.withColumn(shards.HISTORY, empty)
    before = Window.partitionBy(USER_ID).orderBy(shards.SAMPLE).rowsBetween(-length, -1)
    pairs = F.collect_list(F.struct(shards.SAMPLE, shards.ITEM_CODE)).over(before)
    window = F.transform(F.array_sort(pairs), lambda pair: pair[shards.ITEM_CODE])
    first_of_moment = F.col(shards.SAMPLE) == F.col(shards.HISTORY_END)
    moment = Window.partitionBy(USER_ID, TIMESTAMP)
    history = F.first(F.when(first_of_moment, window), ignorenulls=True).over(moment)
    padded = F.concat(
        F.array_repeat(F.lit(PAD_INDEX).cast("long"), F.lit(length) - F.size("_history")),
        F.col("_history"),
    )
    return (
        samples.withColumn("_history", history).withColumn(shards.HISTORY, padded).drop("_history")
    )


_ENCODERS: dict[str, FeatureEncoders] = {}  # on each executor: the job's encoders, by key


def shared_encoders(key: str, broadcast: Broadcast) -> FeatureEncoders:
    """The job's encoders on an executor, built once per Python worker from ``broadcast``
    (their ``to_dict``) and kept under ``key``."""
    found = _ENCODERS.get(key)
    if found is None:
        found = _ENCODERS[key] = FeatureEncoders.from_dict(broadcast.value)
    return found


def id_codes(key: str, broadcast: Broadcast, side: str):  # -> a pandas UDF: id -> code
    """A pandas UDF giving each id its code in the ``side`` (``item``/``user``) vocabulary,
    by the encoders' own ``encode`` (unknown ids: ``OOV_INDEX``)."""

    @F.pandas_udf(T.LongType())  # type: ignore[call-overload]
    def codes(ids: pd.Series) -> pd.Series:
        encoders = shared_encoders(key, broadcast)
        entity = encoders.items if side == "item" else encoders.users
        return pd.Series(entity.ids.encode(ids.reset_index(drop=True)))

    return codes


def user_attribute_inputs(
    users: DataFrame,
    sample_users: DataFrame,
    encoders: FeatureEncoders,
    key: str,
    broadcast: Broadcast,
) -> DataFrame | None:
    """Per sample user (``user_index``), the encoded attribute inputs (``user_cat``,
    ``user_bag``, ``user_num``) from the user table, by the encoders' own ``transform``
    (users missing from the table get unknown attributes), or None without attributes."""
    names = [n for n in encoders.users.input_names if n in shards.USER_ATTRIBUTE_INPUTS]
    if not names:
        return None
    kinds = {"user_cat": T.LongType(), "user_bag": T.LongType(), "user_num": T.FloatType()}
    schema = T.StructType(
        [T.StructField(shards.USER_INDEX, T.LongType())]
        + [T.StructField(n, T.ArrayType(kinds[n])) for n in names]
    )
    wanted = [c for c in users.columns if c in encoders.users.columns.all]
    rows = sample_users.join(users.select(USER_ID, *wanted), USER_ID, "left")

    def encode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        user_encoder = shared_encoders(key, broadcast).users
        for batch in batches:
            table = batch.reset_index(drop=True)
            inputs = user_encoder.transform(table[USER_ID].tolist(), table)
            out = {shards.USER_INDEX: table[shards.USER_INDEX].to_numpy(np.int64)}
            for name in names:
                out[name] = list(inputs[name])
            yield pd.DataFrame(out)

    return rows.mapInPandas(encode, schema)


def build_samples(fit: DataFrame, tables: Tables, encoders: FeatureEncoders) -> DataFrame:
    """One row per training event of ``fit`` (the fit part, or all of train), in sample
    order: the columns of :mod:`shards`. Codes and attribute inputs come from the encoders
    themselves, broadcast to the executors."""
    spark = fit.sparkSession
    key = uuid.uuid4().hex
    broadcast = spark.sparkContext.broadcast(encoders.to_dict())
    samples = with_positions(fit, shards.SAMPLE, event_order())
    sample_users = with_positions(fit.select(USER_ID).distinct(), shards.USER_INDEX, [USER_ID])
    rows = tables.catalogue.select(ITEM_ID, shards.ITEM_ROW)
    weight = F.col(WEIGHT) if WEIGHT in fit.columns else F.lit(1.0)
    samples = (
        samples.join(sample_users, USER_ID)
        .join(rows, ITEM_ID)
        .withColumn(shards.USER_CODE, id_codes(key, broadcast, "user")(F.col(USER_ID)))
        .withColumn(shards.ITEM_CODE, id_codes(key, broadcast, "item")(F.col(ITEM_ID)))
        .withColumn(shards.WEIGHT, weight.cast("float"))
        .withColumn(shards.HISTORY_START, F.min(shards.SAMPLE).over(Window.partitionBy(USER_ID)))
        .withColumn(
            shards.HISTORY_END, F.min(shards.SAMPLE).over(Window.partitionBy(USER_ID, TIMESTAMP))
        )
    )
    samples = history_windows(samples, encoders.history_length)
    columns = [
        shards.SAMPLE,
        shards.USER_INDEX,
        shards.USER_CODE,
        shards.ITEM_ROW,
        shards.ITEM_CODE,
        F.col(TIMESTAMP).alias(shards.TIMESTAMP),
        shards.WEIGHT,
        shards.HISTORY_START,
        shards.HISTORY_END,
        shards.HISTORY,
    ]
    if tables.users is not None:
        attributes = user_attribute_inputs(tables.users, sample_users, encoders, key, broadcast)
        if attributes is not None:
            samples = samples.join(attributes, shards.USER_INDEX, "left")
            columns += [c for c in attributes.columns if c != shards.USER_INDEX]
    return samples.select(*columns)


def run_prepare(spark: SparkSession, settings: PrepareSettings) -> PrepareResult:
    """Run the prepare job; the output directory must be absent or empty (or
    ``settings.overwrite``). Raises :class:`~twotower.errors.TwoTowerError` subclasses
    naming the file, column or row on bad input."""
    settings.check()
    try:
        return _prepare(spark, settings)
    finally:
        release()


def _prepare(spark: SparkSession, settings: PrepareSettings) -> PrepareResult:
    check_output(spark, settings.output, settings.overwrite)
    features = settings.features
    tables = read_inputs(spark, settings)
    events = prepare_events(tables.events, settings.min_rating)
    split = make_split(
        events,
        settings.test_fraction,
        settings.validation_fraction,
        settings.min_interactions,
        settings.cold_items,
        settings.cold_fraction,
        settings.seed,
    )
    parts = (FIT,) if settings.fit_on == "fit" else (FIT, VALIDATION)
    fit = persist(split.part(*parts))
    item_columns = features.item_columns or infer_feature_columns(
        tables.items, ITEM_ID, features.separator
    )
    user_columns = features.user_columns or infer_feature_columns(
        tables.users, USER_ID, features.separator
    )
    item_encoder = fit_entity(
        "item",
        fit.select(F.col(ITEM_ID).alias(VALUE)),
        tables.items,
        item_columns,
        features,
        features.use_item_id,
    )
    user_encoder = fit_entity(
        "user",
        fit.select(F.col(USER_ID).alias(VALUE)),
        tables.users,
        user_columns,
        features,
        features.use_user_id,
    )
    encoders = FeatureEncoders(item_encoder, user_encoder, features.history_length)
    log.info(
        "features: items %s, users %s, %d known items, %d known users",
        item_columns,
        user_columns,
        len(item_encoder.ids.values),
        len(user_encoder.ids.values),
    )
    prepare_output(spark, settings.output, settings.overwrite)  # the inputs are valid
    samples = build_samples(fit, tables, encoders)
    n_samples = split.counts["train" if settings.fit_on == "train" else FIT]
    n_shards = max(1, math.ceil(n_samples / settings.samples_per_shard))
    out = settings.output
    (
        samples.repartitionByRange(n_shards, shards.SAMPLE)
        .sortWithinPartitions(shards.SAMPLE)
        .write.parquet(join(out, shards.SAMPLES))
    )
    catalogue = tables.catalogue.select(
        shards.ITEM_ROW, *[c for c in tables.catalogue.columns if c != shards.ITEM_ROW]
    )
    catalogue.orderBy(shards.ITEM_ROW).coalesce(1).write.parquet(join(out, shards.CATALOGUE))
    split_columns = [c for c in (USER_ID, ITEM_ID, TIMESTAMP, WEIGHT) if c in split.events.columns]
    ordered = with_positions(split.events, shards.EVENT, event_order())
    (
        ordered.select(shards.EVENT, *split_columns, PART)
        .repartitionByRange(n_shards, shards.EVENT)
        .sortWithinPartitions(shards.EVENT)
        .write.parquet(join(out, shards.SPLIT))
    )
    n_items = tables.catalogue.count()
    if is_local(out):
        encoders.save(join(out, shards.ENCODERS))  # the bundle's own writer
    else:
        write_text(spark, join(out, shards.ENCODERS), json.dumps(encoders.to_dict()))
    manifest = shards.prepared_manifest(
        split_stats=split.stats(),
        n_samples=n_samples,
        n_items=n_items,
        n_shards=n_shards,
        encoders=encoders,
        item_columns=item_columns,
        user_columns=user_columns,
        cold_items=split.cold_items,
        settings=settings_dict(settings),
        writer={"spark": spark.version},
    )
    write_text(spark, join(out, shards.MANIFEST), json.dumps(manifest, indent=2))
    log.info("prepared %d samples in %d shard(s) under %s", n_samples, n_shards, out)
    return PrepareResult(out, manifest)
