"""The input schema (interactions, items, users) and its validation.

Validated tables have string ids, float64 timestamps in seconds and, if present, a
float ``weight``. The interactions' ids are Categoricals of sorted string ids (integer
codes per row: :mod:`towers.data.ids`); the item and user tables' ids are strings.
Every failure raises a specific :mod:`twotower.errors` exception
whose message names the source, the column and the offending row or id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from towers.data.ids import encode_id_column, positions_in
from twotower.encoding import FeatureColumns
from twotower.errors import (
    DuplicateIdError,
    EmptyTableError,
    InvalidValueError,
    MissingColumnError,
    UnknownIdError,
)

log = logging.getLogger(__name__)

USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
WEIGHT = "weight"
RATING = "rating"
UNKNOWN_ITEM_POLICIES = ("error", "drop")
MAPPABLE_COLUMNS = (USER_ID, ITEM_ID, TIMESTAMP, WEIGHT, RATING)


@dataclass
class RawData:
    """The three input tables plus which attribute columns feed the towers.

    ``item_features`` / ``user_features`` of ``None`` mean "infer from the column dtypes".
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None = None
    item_features: FeatureColumns | None = None
    user_features: FeatureColumns | None = None
    name: str = "data"
    info: dict[str, str] = field(default_factory=dict)


def _require_rows(table: pd.DataFrame, source: str, what: str) -> None:
    if len(table) == 0:
        raise EmptyTableError(f"{source}: the {what} table is empty")


def _require_columns(table: pd.DataFrame, columns: list[str], source: str, what: str) -> None:
    for column in columns:
        if column not in table.columns:
            raise MissingColumnError(
                f"{source}: {what} table has no column '{column}' "
                f"(columns: {', '.join(map(str, table.columns))})"
            )


def _first_bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def normalise_ids(column: pd.Series, source: str, name: str) -> pd.Series:
    """Ids as strings; integral floats lose their ``.0``; a missing id is an error."""
    missing = column.isna().to_numpy()
    if missing.any():
        row = _first_bad_row(missing)
        raise InvalidValueError(
            f"{source}: column '{name}' has a missing value at row {row} "
            f"({int(missing.sum())} missing in all)"
        )
    if pd.api.types.is_float_dtype(column) and np.all(np.mod(column.to_numpy(), 1) == 0):
        column = column.astype(np.int64)
    return column.astype(str).astype(object).reset_index(drop=True)


def parse_timestamps(column: pd.Series, source: str) -> np.ndarray:
    """Seconds since the epoch as float64, from numbers or date-time strings."""
    if pd.api.types.is_bool_dtype(column):
        raise InvalidValueError(f"{source}: column '{TIMESTAMP}' holds booleans, not times")
    if pd.api.types.is_numeric_dtype(column):
        values = column.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
    else:
        if not pd.api.types.is_datetime64_any_dtype(column):
            numeric = pd.to_numeric(column, errors="coerce")
            if numeric.notna().all():
                return parse_timestamps(numeric, source)
        # Seconds via a timedelta, whatever the datetime unit (ns, us, ...) pandas chose.
        parsed = pd.to_datetime(column, errors="coerce", utc=True, format="mixed")
        bad = parsed.isna().to_numpy()
        seconds = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        values = seconds.to_numpy(dtype=np.float64, na_value=np.nan)
    if bad.any():
        row = _first_bad_row(bad)
        raise InvalidValueError(
            f"{source}: column '{TIMESTAMP}' cannot be parsed as a time at row {row} "
            f"(value {column.iloc[row]!r})"
        )
    return np.asarray(values, dtype=np.float64)


def validate_interactions(table: pd.DataFrame, source: str = "interactions") -> pd.DataFrame:
    """Check and normalise an interactions table (``user_id``, ``item_id``, ``timestamp``).

    Without a ``timestamp`` column the file order is the time order (row ``r`` happened
    at time ``r``), with a warning: each user's test events are then their last rows.
    """
    _require_rows(table, source, "interactions")
    _require_columns(table, [USER_ID, ITEM_ID], source, "interactions")
    out = table.reset_index(drop=True)
    out[USER_ID] = encode_id_column(out[USER_ID], source, USER_ID)
    out[ITEM_ID] = encode_id_column(out[ITEM_ID], source, ITEM_ID)
    if TIMESTAMP in out.columns:
        out[TIMESTAMP] = parse_timestamps(out[TIMESTAMP], source)
    else:
        log.warning(
            "%s: no '%s' column; taking the file order as the time order (each user's "
            "last rows become their test events)",
            source,
            TIMESTAMP,
        )
        out[TIMESTAMP] = np.arange(len(out), dtype=np.float64)
    for optional in (WEIGHT, RATING):
        if optional in out.columns:
            values = pd.to_numeric(out[optional], errors="coerce")
            bad = values.isna().to_numpy()
            if bad.any():
                row = _first_bad_row(bad)
                raise InvalidValueError(
                    f"{source}: column '{optional}' is not a number at row {row} "
                    f"(value {out[optional].iloc[row]!r})"
                )
            out[optional] = values.astype(np.float64)
    if WEIGHT in out.columns:
        weights = out[WEIGHT].to_numpy()
        for bad, what in ((~np.isfinite(weights), "not finite"), (weights < 0, "negative")):
            if bad.any():
                row = _first_bad_row(bad)
                raise InvalidValueError(
                    f"{source}: column '{WEIGHT}' is {what} at row {row} (value {weights[row]!r})"
                )
        if not (weights > 0).any():
            raise InvalidValueError(f"{source}: column '{WEIGHT}' is zero on every row")
    return out


def rename_columns(table: pd.DataFrame, columns: Mapping[str, str], source: str) -> pd.DataFrame:
    """Rename source columns to twotower's names: ``columns`` maps a twotower name
    (``user_id``, ``item_id``, ``timestamp``, ``weight``, ``rating``) to the table's own
    (e.g. ``{"user_id": "customer_id"}``); names a table lacks are left for validation."""
    unknown = sorted(set(columns) - set(MAPPABLE_COLUMNS))
    if unknown:
        raise MissingColumnError(
            f"{source}: cannot map {unknown}; data.columns maps {list(MAPPABLE_COLUMNS)}"
        )
    renames = {theirs: ours for ours, theirs in columns.items() if theirs in table.columns}
    clashes = [ours for theirs, ours in renames.items() if ours in table.columns and ours != theirs]
    if clashes:
        raise DuplicateIdError(
            f"{source}: has both its own '{clashes[0]}' column and one mapped onto it"
        )
    return table.rename(columns=renames)


def validate_entities(table: pd.DataFrame, id_column: str, source: str, what: str) -> pd.DataFrame:
    """Check an item or user table: id column present, no missing or duplicate ids."""
    _require_rows(table, source, what)
    _require_columns(table, [id_column], source, what)
    out = table.reset_index(drop=True).copy()
    out[id_column] = normalise_ids(out[id_column], source, id_column)
    duplicated = out[id_column].duplicated(keep=False).to_numpy()
    if duplicated.any():
        rows = np.flatnonzero(duplicated)
        dup_id = out[id_column].iloc[rows[0]]
        dup_rows = np.flatnonzero((out[id_column] == dup_id).to_numpy()).tolist()
        raise DuplicateIdError(
            f"{source}: duplicate {id_column} '{dup_id}' at rows {dup_rows} "
            f"({len(set(out[id_column].iloc[rows]))} duplicated ids in all)"
        )
    return out


def check_known_items(
    interactions: pd.DataFrame, items: pd.DataFrame, policy: str, source: str
) -> pd.DataFrame:
    """Interactions whose item is missing from the item table: raise, or drop and log."""
    if policy not in UNKNOWN_ITEM_POLICIES:
        raise ValueError(f"unknown_items must be one of {UNKNOWN_ITEM_POLICIES}, got {policy!r}")
    known = positions_in(pd.Index(items[ITEM_ID], dtype=object), interactions[ITEM_ID]) >= 0
    if known.all():
        return interactions
    unknown_ids = pd.unique(interactions.loc[~known, ITEM_ID])
    if policy == "error":
        row = _first_bad_row(~known)
        raise UnknownIdError(
            f"{source}: {int((~known).sum())} interaction(s) name items missing from the item "
            f"table, first at row {row}: item_id {unknown_ids[:5].tolist()}"
            " (set data.unknown_items=drop to drop them)"
        )
    log.warning(
        "%s: dropped %d interaction(s) with %d item id(s) missing from the item table",
        source,
        int((~known).sum()),
        len(unknown_ids),
    )
    out = interactions.loc[known].reset_index(drop=True)
    _require_rows(out, source, "interactions (after dropping unknown items)")
    return out


def infer_feature_columns(
    table: pd.DataFrame | None, id_column: str, separator: str = "|", max_categories: int = 1000
) -> FeatureColumns:
    """Guess feature kinds from dtypes: numbers -> numeric; strings holding ``separator`` ->
    multi-hot; other low-cardinality strings -> categorical; free text (mostly several
    words) -> hashed text; other high-cardinality strings (ids, codes) are skipped."""
    columns = FeatureColumns()
    if table is None:
        return columns
    for name in table.columns:
        if name == id_column:
            continue
        col = table[name]
        if col.isna().all():
            continue
        if pd.api.types.is_bool_dtype(col):
            columns.categorical.append(name)
        elif pd.api.types.is_numeric_dtype(col):
            columns.numeric.append(name)
        elif col.map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any() or (
            col.astype(str).str.contains(separator, regex=False).mean() > 0.05
        ):
            columns.multi_hot.append(name)
        elif col.nunique() <= min(max_categories, max(2, len(col) // 2)):
            columns.categorical.append(name)
        elif col.astype(str).str.contains(" ", regex=False).mean() > 0.5:
            columns.text.append(name)
        else:
            log.info("column '%s' looks like an id or a code; not used as a feature", name)
    return columns
