"""From validated tables to everything training and evaluation need, as numpy arrays.

Fits the feature encoders on the fit part of train, builds leakage-free training
samples, and the validation / test evaluation sets (user inputs, items to exclude,
held-out targets), all indexed by catalogue row (the item table's order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from towers.data.samples import HistorySource, history_bounds, latest_histories
from towers.data.schema import ITEM_ID, USER_ID, WEIGHT, RawData, infer_feature_columns
from towers.data.split import Split
from twotower.encoding import EntityEncoder, FeatureColumns, FeatureEncoders
from twotower.errors import UnknownIdError

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
class EvalSet:
    """Users to score, their tower inputs, what to exclude and what to find (catalogue rows).

    ``unavailable_items``: catalogue rows that are no one's candidate in this evaluation
    (in the cold-item split, validation does not rank the test's held-out items: they
    belong to the test's future, as the validation items belong to validation's)."""

    user_ids: np.ndarray
    user_inputs: dict[str, np.ndarray]
    exclude_users: np.ndarray
    exclude_items: np.ndarray
    target_users: np.ndarray
    target_items: np.ndarray
    popularity: np.ndarray
    unavailable_items: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


@dataclass
class PreparedData:
    """Encoders, catalogue inputs, training samples and evaluation sets of one experiment."""

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
    validation: EvalSet
    test: EvalSet
    info: dict[str, object] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.catalogue)

    @property
    def n_samples(self) -> int:
        return len(self.sample_item_rows)


def catalogue_rows(catalogue: pd.DataFrame, item_ids: pd.Series | np.ndarray) -> np.ndarray:
    """Row of each item id in the catalogue; an id missing from it is an error."""
    rows = pd.Index(catalogue[ITEM_ID]).get_indexer(np.asarray(item_ids, dtype=object))
    if (rows < 0).any():
        missing = np.asarray(item_ids, dtype=object)[rows < 0]
        raise UnknownIdError(f"item_id {missing[:5].tolist()} not in the item table")
    return rows.astype(np.int64)


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


def user_attribute_rows(users: pd.DataFrame | None, user_ids: np.ndarray) -> pd.DataFrame | None:
    """Rows of the user table aligned with ``user_ids`` (all-missing for unknown users)."""
    if users is None:
        return None
    return (
        users.set_index(USER_ID)
        .reindex(pd.Index(user_ids, dtype=object, name=USER_ID))
        .reset_index()
    )


def encode_users(
    encoders: FeatureEncoders,
    users: pd.DataFrame | None,
    user_ids: np.ndarray,
    histories: np.ndarray,
) -> dict[str, np.ndarray]:
    """User-tower inputs for ``user_ids`` with their encoded ``histories``."""
    return encoders.user_inputs(list(user_ids), histories, user_attribute_rows(users, user_ids))


def build_eval_set(
    known: pd.DataFrame,
    held_out: pd.DataFrame,
    catalogue: pd.DataFrame,
    users: pd.DataFrame | None,
    encoders: FeatureEncoders,
    unavailable_items: np.ndarray | None = None,
) -> EvalSet:
    """Score the users of ``held_out`` from their ``known`` events (history and exclusions);
    ``unavailable_items`` (item ids) are ranked for no one."""
    user_ids = np.asarray(pd.unique(held_out[USER_ID]), dtype=object)
    position = pd.Index(user_ids)
    item_codes = encoders.items.ids.encode(known[ITEM_ID])
    known_users, known_histories = latest_histories(known, item_codes, encoders.history_length)
    histories = np.zeros((len(user_ids), encoders.history_length), dtype=np.int64)
    found = position.get_indexer(known_users)
    histories[found[found >= 0]] = known_histories[found >= 0]
    seen = known.loc[known[USER_ID].isin(position)]
    exclude_users = position.get_indexer(seen[USER_ID]).astype(np.int64)
    exclude_items = catalogue_rows(catalogue, seen[ITEM_ID])
    order = np.argsort(exclude_users, kind="stable")
    popularity = np.bincount(catalogue_rows(catalogue, known[ITEM_ID]), minlength=len(catalogue))
    return EvalSet(
        user_ids=user_ids,
        user_inputs=encode_users(encoders, users, user_ids, histories),
        exclude_users=exclude_users[order],
        exclude_items=exclude_items[order],
        target_users=position.get_indexer(held_out[USER_ID]).astype(np.int64),
        target_items=catalogue_rows(catalogue, held_out[ITEM_ID]),
        popularity=popularity.astype(np.float64),
        unavailable_items=catalogue_rows(
            catalogue, np.asarray([] if unavailable_items is None else unavailable_items)
        ),
    )


@dataclass
class TrainingSamples:
    """One sample per fit event: its user's tower inputs (all but the history), its item,
    weight, and what rebuilds its history (``histories.windows``)."""

    user_inputs: dict[str, np.ndarray]
    item_rows: np.ndarray
    weights: np.ndarray
    histories: HistorySource
    item_log_p: np.ndarray


def item_log_p(item_rows: np.ndarray, n_items: int) -> np.ndarray:
    """Each catalogue row's log share of the training samples (``item_rows``: their
    positives; an item never trained on counts once): the sampled-softmax correction."""
    counts = np.bincount(item_rows, minlength=n_items).astype(np.float64)
    return np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32)


def build_training_samples(
    raw: RawData, fit: pd.DataFrame, catalogue: pd.DataFrame, encoders: FeatureEncoders
) -> TrainingSamples:
    """Leakage-free samples of the ``fit`` events (sorted by user, then time)."""
    length = encoders.history_length
    item_codes = encoders.items.ids.encode(fit[ITEM_ID])
    starts, ends = history_bounds(fit)
    sample_users, user_codes = np.unique(fit[USER_ID].to_numpy(dtype=object), return_inverse=True)
    per_user = encoders.users.transform(
        list(sample_users), user_attribute_rows(raw.users, sample_users)
    )
    # the histories are not materialised here ((samples x length) int64: most of the
    # memory at scale); each batch cuts its own from ``histories`` (a HistorySource)
    user_inputs = {name: values[user_codes] for name, values in per_user.items()}
    item_rows = catalogue_rows(catalogue, fit[ITEM_ID])
    weights = (
        fit[WEIGHT].to_numpy(np.float32) if WEIGHT in fit.columns else np.ones(len(fit), np.float32)
    )
    return TrainingSamples(
        user_inputs,
        item_rows,
        weights,
        HistorySource(item_codes, starts, ends, length),
        item_log_p(item_rows, len(catalogue)),
    )


def build_eval_sets(
    raw: RawData,
    split: Split,
    fit: pd.DataFrame,
    catalogue: pd.DataFrame,
    encoders: FeatureEncoders,
) -> tuple[EvalSet, EvalSet]:
    """The validation set (users of ``split.validation``, known from ``fit``) and the test
    set (users of ``split.test``, known from all of train)."""
    # the cold split's test items do not exist yet in validation's world: validation
    # ranks train's items only, its own held-out items among them, as test ranks all
    validation = build_eval_set(
        fit, split.validation, catalogue, raw.users, encoders, split.cold_items
    )
    test = build_eval_set(split.train, split.test, catalogue, raw.users, encoders)
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
    validation, test = build_eval_sets(raw, split, fit, catalogue, encoders)
    return assemble_prepared(raw, split, catalogue, encoders, samples, (validation, test), fit_on)


def assemble_prepared(
    raw: RawData,
    split: Split,
    catalogue: pd.DataFrame,
    encoders: FeatureEncoders,
    samples: TrainingSamples,
    eval_sets: tuple[EvalSet, EvalSet],
    fit_on: str,
) -> PreparedData:
    """The :class:`PreparedData` of stages already run (encoders, samples, the
    validation and test sets), for callers that time or run them one by one."""
    validation, test = eval_sets
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
        item_log_p=samples.item_log_p,
        validation=validation,
        test=test,
        info={"dataset": raw.name, "trained_on": fit_on, **split.stats()},
    )
