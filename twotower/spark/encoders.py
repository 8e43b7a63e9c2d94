"""Fitting the feature encoders in Spark, with the single-machine rules.

Every vocabulary is counted in the cluster; the counts of its values come back to the
driver, which keeps and orders them as :meth:`Vocabulary.fit` does (values kept from
``min_count`` on, most frequent first, ties by value), to build the same :class:`~twotower.encoding.
EntityEncoder` objects that :func:`towers.data.prepare.fit_encoders` builds, saved with
the bundle's own writer (:meth:`FeatureEncoders.save`). Cells become strings and tokens
through the single-machine functions themselves (``as_str_or_none``, ``split_tokens``,
``words_of``) in pandas UDFs. Numeric columns' mean and standard deviation are Spark's
aggregates: equal to pandas' up to floating-point summation order (about 1e-15
relative).
"""

from __future__ import annotations

import logging

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from towers.data.prepare import FeatureSettings
from twotower.encoding import (
    EntityEncoder,
    FeatureColumns,
    HashedTextEncoder,
    MultiHotEncoder,
    NumericEncoder,
    Vocabulary,
    split_tokens,
    words_of,
)
from twotower.errors import MissingColumnError
from twotower.spark.frames import ROW
from twotower.spark.tables import FRACTIONAL_TYPES, as_strings

log = logging.getLogger(__name__)

VALUE = "value"
MAX_CATEGORIES = 1000


def fit_vocabulary(values: DataFrame, min_count: int) -> Vocabulary:
    """The vocabulary of the strings in column :data:`VALUE` of ``values`` (nulls
    skipped), as :meth:`Vocabulary.fit`: counted in the cluster, ordered on the driver."""
    counts = (
        values.filter(F.col(VALUE).isNotNull())
        .groupBy(VALUE)
        .agg(F.count(F.lit(1)).alias("count"))
        .filter(F.col("count") >= min_count)
        .collect()
    )
    ordered = sorted((-int(r["count"]), r[VALUE]) for r in counts)
    return Vocabulary(values=[value for _, value in ordered])


def token_lists(separator: str):  # -> a pandas UDF: cell -> array<string>
    """A pandas UDF splitting cells into tokens with :func:`split_tokens`."""

    @F.pandas_udf(T.ArrayType(T.StringType()))  # type: ignore[call-overload]
    def tokens(cells: pd.Series) -> pd.Series:
        return cells.map(lambda cell: split_tokens(cell, separator))

    return tokens


@F.pandas_udf(T.ArrayType(T.StringType()))  # type: ignore[call-overload]
def distinct_words(texts: pd.Series) -> pd.Series:
    """The distinct words of each text cell (:func:`words_of`)."""
    return texts.map(lambda text: sorted(set(words_of(text))))


def fit_multi_hot(table: DataFrame, name: str, settings: FeatureSettings) -> MultiHotEncoder:
    """:meth:`MultiHotEncoder.fit` over column ``name``: the token vocabulary and the bag
    width (the longest row, capped at ``max_bag_tokens``), from one pass of counts."""
    tokens = table.select(token_lists(settings.separator)(F.col(name)).alias("tokens"))
    counts = (
        tokens.select(F.explode_outer("tokens").alias(VALUE), F.size("tokens").alias("size"))
        .groupBy(VALUE)
        .agg(F.count(F.lit(1)).alias("count"), F.max("size").alias("longest"))
        .collect()
    )
    longest = max((int(r["longest"]) for r in counts), default=0)
    kept = [
        (-int(r["count"]), r[VALUE])
        for r in counts
        if r[VALUE] is not None and r["count"] >= settings.category_min_count
    ]
    vocabulary = Vocabulary(values=[value for _, value in sorted(kept)])
    width = max(1, min(settings.max_bag_tokens, longest))
    return MultiHotEncoder(vocabulary, width, settings.separator)


def fit_numeric(table: DataFrame, name: str) -> NumericEncoder:
    """:meth:`NumericEncoder.fit`: mean and population standard deviation of the values
    that are numbers (others skipped); a constant column gets standard deviation 1."""
    kind = table.schema[name].dataType
    value = F.col(name).cast("double")
    if isinstance(kind, FRACTIONAL_TYPES):
        value = F.when(~F.isnan(F.col(name)), value)
    found = (
        table.select(value.alias("v"))
        .agg(F.avg("v").alias("mean"), F.stddev_pop("v").alias("std"), F.count("v").alias("n"))
        .first()
    )
    assert found is not None
    mean = float(found["mean"]) if found["n"] else 0.0
    std = float(found["std"]) if found["n"] > 1 else 0.0
    return NumericEncoder(mean=mean, std=std if std > 1e-12 else 1.0)


def fit_text(seen: DataFrame, name: str, settings: FeatureSettings) -> HashedTextEncoder:
    """:meth:`HashedTextEncoder.fit`: every word (``text_min_count`` 1), or the words found
    in at least ``text_min_count`` rows of ``seen`` (the entities of the training events)."""
    if settings.text_min_count <= 1:
        return HashedTextEncoder(settings.text_buckets, settings.max_text_tokens)
    words = seen.select(F.explode(distinct_words(F.col(name))).alias(VALUE))
    known = fit_vocabulary(words, settings.text_min_count)
    return HashedTextEncoder(
        settings.text_buckets, settings.max_text_tokens, frozenset(known.values)
    )


def infer_feature_columns(
    table: DataFrame | None,
    id_column: str,
    separator: str = "|",
    max_categories: int = MAX_CATEGORIES,
) -> FeatureColumns:
    """The column kinds :func:`towers.data.schema.infer_feature_columns` would guess, from
    one pass of counts: booleans -> categorical; numbers -> numeric; lists, or strings
    holding ``separator`` in over 5% of rows -> multi-hot; strings with few distinct values
    -> categorical; strings of several words in over half the rows -> text; other columns
    (ids, codes) are skipped, as are empty ones."""
    columns = FeatureColumns()
    if table is None:
        return columns
    fields = [f for f in table.schema.fields if f.name not in (id_column, ROW)]
    if not fields:
        return columns
    aggregates: list[Column] = [F.count(F.lit(1)).alias("_rows")]
    for i, field in enumerate(fields):
        column = F.col(field.name)
        present = column.isNotNull()
        if isinstance(field.dataType, FRACTIONAL_TYPES):
            present = present & ~F.isnan(column)
        aggregates.append(F.sum(present.cast("long")).alias(f"present{i}"))
        if _is_text_like(field.dataType):
            text = column.cast("string")
            aggregates += [
                F.sum(F.coalesce(text.contains(separator), F.lit(False)).cast("long")).alias(
                    f"separated{i}"
                ),
                F.countDistinct(text).alias(f"distinct{i}"),
                F.sum(F.coalesce(text.contains(" "), F.lit(False)).cast("long")).alias(
                    f"spaced{i}"
                ),
            ]
    found = table.agg(*aggregates).first()
    assert found is not None
    rows = int(found["_rows"])
    for i, field in enumerate(fields):
        name, kind = field.name, field.dataType
        if not found[f"present{i}"]:
            continue
        if isinstance(kind, T.BooleanType):
            columns.categorical.append(name)
        elif isinstance(kind, T.NumericType):
            columns.numeric.append(name)
        elif isinstance(kind, T.ArrayType) or found[f"separated{i}"] / rows > 0.05:
            columns.multi_hot.append(name)
        elif found[f"distinct{i}"] <= min(max_categories, max(2, rows // 2)):
            columns.categorical.append(name)
        elif found[f"spaced{i}"] / rows > 0.5:
            columns.text.append(name)
        else:
            log.info("column '%s' looks like an id or a code; not used as a feature", name)
    return columns


def _is_text_like(kind: T.DataType) -> bool:
    return not isinstance(kind, (T.BooleanType, T.NumericType, T.ArrayType))


def fit_entity(
    prefix: str,
    id_values: DataFrame,
    table: DataFrame | None,
    columns: FeatureColumns,
    settings: FeatureSettings,
    use_id: bool,
) -> EntityEncoder:
    """:meth:`EntityEncoder.fit` in Spark: the id vocabulary over ``id_values`` (column
    :data:`VALUE`, one row per training event) and the attribute encoders over ``table``;
    text words over the rows of ``table`` whose id is among ``id_values``."""
    id_column = f"{prefix}_id"
    vocabulary = fit_vocabulary(id_values, settings.id_min_count)
    available = [] if table is None else table.columns
    missing = [c for c in columns.all if c not in available]
    if missing:
        raise MissingColumnError(f"{prefix} feature column(s) {missing} not in the {prefix} table")
    categorical: dict[str, Vocabulary] = {}
    multi_hot: dict[str, MultiHotEncoder] = {}
    numeric: dict[str, NumericEncoder] = {}
    text: dict[str, HashedTextEncoder] = {}
    if table is not None:
        for name in columns.categorical:
            values = table.select(as_strings(table, name).alias(VALUE))
            categorical[name] = fit_vocabulary(values, settings.category_min_count)
        for name in columns.multi_hot:
            multi_hot[name] = fit_multi_hot(table, name, settings)
        for name in columns.numeric:
            numeric[name] = fit_numeric(table, name)
        if columns.text:
            seen_ids = id_values.select(F.col(VALUE).alias(id_column)).distinct()
            seen = (
                table.join(seen_ids, id_column, "left_semi")
                if id_column in table.columns
                else table
            )
            for name in columns.text:
                text[name] = fit_text(seen, name, settings)
    return EntityEncoder(
        prefix=prefix,
        ids=vocabulary,
        use_id=use_id,
        categorical=categorical,
        multi_hot=multi_hot,
        numeric=numeric,
        text=text,
    )
