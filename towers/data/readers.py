"""Read the three input tables from CSV, Parquet or pandas DataFrames, and validate them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

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

TableSource = str | Path | pd.DataFrame
ID_COLUMNS = {USER_ID: str, ITEM_ID: str}


def read_table(source: TableSource) -> tuple[pd.DataFrame, str]:
    """A DataFrame and a name for messages, from a DataFrame or a .csv/.tsv/.parquet path."""
    if isinstance(source, pd.DataFrame):
        return source, "DataFrame"
    path = Path(source)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
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
    raw_events, events_source = read_table(interactions)
    raw_events = rename_columns(raw_events, columns, events_source)
    events = validate_interactions(raw_events, events_source)
    if items is None:
        item_table = pd.DataFrame({ITEM_ID: pd.unique(events[ITEM_ID])})
    else:
        raw_items, items_source = read_table(items)
        raw_items = rename_columns(raw_items, columns, items_source)
        item_table = validate_entities(raw_items, ITEM_ID, items_source, "item")
        events = check_known_items(events, item_table, unknown_items, events_source)
    user_table = None
    if users is not None:
        raw_users, users_source = read_table(users)
        raw_users = rename_columns(raw_users, columns, users_source)
        user_table = validate_entities(raw_users, USER_ID, users_source, "user")
    return RawData(events, item_table, user_table, item_features, user_features, name)
