"""From validated tables to everything training and evaluation need, as numpy arrays.

Fits the feature encoders on the fit part of train, builds leakage-free training
samples, and the validation / test evaluation sets (user inputs, items to exclude,
held-out targets), all indexed by catalogue row (the item table's order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from towers.data.eval_sets import (
    EvalSet,
    EvalSource,
    catalogue_rows,
    user_attribute_rows,
)
from towers.data.ids import id_codes
from towers.data.samples import HistorySource, ascending, history_bounds, position_dtype, runs
from towers.data.schema import ITEM_ID, USER_ID, WEIGHT, RawData, infer_feature_columns
from towers.data.split import Split
from twotower.encoding import EntityEncoder, FeatureColumns, FeatureEncoders

if TYPE_CHECKING:
    from towers.data.shard_stream import SampleStream

log = logging.getLogger(__name__)


@dataclass
class FeatureSettings:
    """How raw tables become tower inputs (the ``features`` config group)."""

    history_length: int = 50
    use_item_id: bool = True
    use_user_id: bool = True
    id_min_count: int = 1
    category_min_count: int = 1
    max_bag_tokens: int = 16
    separator: str = "|"
    text_buckets: int = 1 << 14
    max_text_tokens: int = 8
    text_min_count: int = 1
    item_columns: FeatureColumns | None = None
    user_columns: FeatureColumns | None = None


@dataclass
class PreparedData:
    """Encoders, catalogue inputs, training samples and evaluation sets of one experiment
    (each set as the :class:`EvalSource` that builds any range of its users).

    With ``sample_stream`` the training samples stay on disk (shards streamed by
    :class:`towers.data.shard_stream.ShardBatches`) and the ``sample_*`` arrays are
    empty."""

    catalogue: pd.DataFrame
    users: pd.DataFrame | None
    split: Split
    encoders: FeatureEncoders
    catalogue_inputs: dict[str, np.ndarray]
    sample_user_inputs: dict[str, np.ndarray]
    sample_item_rows: np.ndarray
    sample_weights: np.ndarray
    sample_histories: HistorySource
    item_log_p: np.ndarray
    validation_source: EvalSource
    test_source: EvalSource
    sample_user_rows: np.ndarray | None = None
    info: dict[str, object] = field(default_factory=dict)
    sample_stream: SampleStream | None = None

    def user_inputs_of_samples(self, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The user inputs (all but the history) of the samples at ``positions`` (all by
        default), one row per sample, whether stored per sample or per user."""
        rows = self.sample_user_rows
        if positions is not None:
            rows = positions if rows is None else rows[positions]
        if rows is None:
            return dict(self.sample_user_inputs)
        return {name: values[rows] for name, values in self.sample_user_inputs.items()}

    @cached_property
    def validation(self) -> EvalSet:
        """The whole validation set (built on first use; evaluation streams
        ``validation_source`` instead)."""
        return self.validation_source.materialise()

    @cached_property
    def test(self) -> EvalSet:
        """The whole test set (built on first use; evaluation streams ``test_source``)."""
        return self.test_source.materialise()

    @property
    def n_items(self) -> int:
        return len(self.catalogue)

    @property
    def n_samples(self) -> int:
        if self.sample_stream is not None:
            return self.sample_stream.n_samples
        return len(self.sample_item_rows)


def fit_encoders(
    raw: RawData, fit_events: pd.DataFrame, settings: FeatureSettings
) -> FeatureEncoders:
    """Fit id vocabularies on the fit events and attribute encoders on the entity tables."""
    item_columns = (
        settings.item_columns
        or raw.item_features
        or infer_feature_columns(raw.items, ITEM_ID, settings.separator)
    )
    user_columns = (
        settings.user_columns
        or raw.user_features
        or infer_feature_columns(raw.users, USER_ID, settings.separator)
    )
    common = {
        "id_min_count": settings.id_min_count,
        "category_min_count": settings.category_min_count,
        "max_bag_tokens": settings.max_bag_tokens,
        "separator": settings.separator,
        "text_buckets": settings.text_buckets,
        "max_text_tokens": settings.max_text_tokens,
        "text_min_count": settings.text_min_count,
    }
    items = EntityEncoder.fit(
        "item", fit_events[ITEM_ID], raw.items, item_columns, use_id=settings.use_item_id, **common
    )
    users = EntityEncoder.fit(
        "user", fit_events[USER_ID], raw.users, user_columns, use_id=settings.use_user_id, **common
    )
    log.info(
        "features: items %s, users %s, %d known items, %d known users",
        item_columns,
        user_columns,
        len(items.ids.values),
        len(users.ids.values),
    )
    return FeatureEncoders(items, users, settings.history_length)


@dataclass
class TrainingSamples:
    """One sample per fit event: its user's tower inputs (all but the history), its item,
    weight, and what rebuilds its history (``histories.windows``).

    With ``user_rows``, ``user_inputs`` hold one row per user and ``user_rows[i]`` is
    sample ``i``'s row (a few bytes per sample instead of every input); without, they
    hold one row per sample."""

    user_inputs: dict[str, np.ndarray]
    item_rows: np.ndarray
    weights: np.ndarray
    histories: HistorySource
    item_log_p: np.ndarray
    user_rows: np.ndarray | None = None


def item_log_p(item_rows: np.ndarray, n_items: int) -> np.ndarray:
    """Each catalogue row's log share of the training samples (``item_rows``: their
    positives; an item never trained on counts once): the sampled-softmax correction."""
    return item_log_p_of_counts(np.bincount(item_rows, minlength=n_items))


def item_log_p_of_counts(counts: np.ndarray) -> np.ndarray:
    """:func:`item_log_p` from each catalogue row's count of training samples."""
    counts = counts.astype(np.float64)
    return np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32)


def _narrow(values: np.ndarray) -> np.ndarray:
    """Non-negative integer ``values`` as int32 when they fit (half the memory)."""
    if len(values) and values.max() >= np.iinfo(np.int32).max:
        return values
    return values.astype(np.int32, copy=False)


def distinct_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(codes, return_inverse=True)``, from the runs of equal codes when they
    never decrease (events sorted by user: no sorted copy and int64 inverse of every row)."""
    if not ascending(codes):
        return np.unique(codes, return_inverse=True)
    first, end = runs(codes)
    return codes[first], np.repeat(
        np.arange(len(first), dtype=position_dtype(len(first))), end - first
    )


def build_training_samples(
    raw: RawData, fit: pd.DataFrame, catalogue: pd.DataFrame, encoders: FeatureEncoders
) -> TrainingSamples:
    """Leakage-free samples of the ``fit`` events (sorted by user, then time)."""
    length = encoders.history_length
    # int32 where it fits: these are a few integers per sample, the bulk of the memory
    item_codes = encoders.items.ids.encode(
        fit[ITEM_ID], dtype=position_dtype(encoders.items.ids.size)
    )
    starts, ends = (_narrow(bounds) for bounds in history_bounds(fit))
    codes, ids = id_codes(fit[USER_ID])
    present, user_codes = distinct_codes(codes)
    sample_users = ids[present]  # sorted, as the ids sort
    per_user = encoders.users.transform(
        list(sample_users), user_attribute_rows(raw.users, sample_users)
    )
    # neither the histories ((samples x length) int64: most of the memory at scale) nor
    # the user inputs are materialised per sample: each batch cuts its own histories
    # from ``histories`` (a HistorySource) and gathers its users' rows by ``user_rows``
    item_rows = catalogue_rows(catalogue, fit[ITEM_ID])
    weights = (
        fit[WEIGHT].to_numpy(np.float32) if WEIGHT in fit.columns else np.ones(len(fit), np.float32)
    )
    return TrainingSamples(
        per_user,
        item_rows,
        weights,
        HistorySource(item_codes, starts, ends, length),
        item_log_p(item_rows, len(catalogue)),
        user_rows=_narrow(user_codes),
    )


def build_eval_sources(
    raw: RawData,
    split: Split,
    fit: pd.DataFrame,
    catalogue: pd.DataFrame,
    encoders: FeatureEncoders,
) -> tuple[EvalSource, EvalSource]:
    """The validation set (users of ``split.validation``, known from ``fit``) and the test
    set (users of ``split.test``, known from all of train), as sources of user ranges."""
    # the cold split's test items do not exist yet in validation's world: validation
    # ranks train's items only, its own held-out items among them, as test ranks all
    validation = EvalSource(fit, split.validation, catalogue, raw.users, encoders, split.cold_items)
    test = EvalSource(split.train, split.test, catalogue, raw.users, encoders)
    return validation, test


def prepare_data(
    raw: RawData, split: Split, settings: FeatureSettings, fit_on: str = "fit"
) -> PreparedData:
    """Encoders, training samples and validation / test sets.

    ``fit_on="fit"`` trains on train minus validation (model selection); ``"train"``
    trains on all of train (the refit after selection; validation is then seen data).
    """
    if fit_on not in ("fit", "train"):
        raise ValueError(f"fit_on must be 'fit' or 'train', got {fit_on!r}")
    catalogue = raw.items.reset_index(drop=True)
    fit = split.fit if fit_on == "fit" else split.train
    encoders = fit_encoders(raw, fit, settings)
    samples = build_training_samples(raw, fit, catalogue, encoders)
    eval_sources = build_eval_sources(raw, split, fit, catalogue, encoders)
    return assemble_prepared(raw, split, catalogue, encoders, samples, eval_sources, fit_on)


def assemble_prepared(
    raw: RawData,
    split: Split,
    catalogue: pd.DataFrame,
    encoders: FeatureEncoders,
    samples: TrainingSamples,
    eval_sources: tuple[EvalSource, EvalSource],
    fit_on: str,
) -> PreparedData:
    """The :class:`PreparedData` of stages already run (encoders, samples, the
    validation and test sources), for callers that time or run them one by one."""
    validation, test = eval_sources
    return PreparedData(
        catalogue=catalogue,
        users=raw.users,
        split=split,
        encoders=encoders,
        catalogue_inputs=encoders.item_inputs(catalogue),
        sample_user_inputs=samples.user_inputs,
        sample_item_rows=samples.item_rows,
        sample_weights=samples.weights,
        sample_histories=samples.histories,
        sample_user_rows=samples.user_rows,
        item_log_p=samples.item_log_p,
        validation_source=validation,
        test_source=test,
        info={"dataset": raw.name, "trained_on": fit_on, **split.stats()},
    )
