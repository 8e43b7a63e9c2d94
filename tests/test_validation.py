"""Every validation error raises a specific exception naming the file, column, row or id."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from towers.data.readers import load_tables
from twotower.errors import (
    DuplicateIdError,
    EmptyTableError,
    InvalidValueError,
    MissingColumnError,
    MissingFileError,
    UnknownIdError,
)


@pytest.fixture
def items_csv(tmp_path: Path) -> Path:
    path = tmp_path / "items.csv"
    pd.DataFrame({"item_id": ["a", "b", "c"], "genre": ["x", "y", "x"]}).to_csv(path, index=False)
    return path


def events(**columns: list) -> pd.DataFrame:
    base = {"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "c"], "timestamp": [1, 2, 3]}
    base.update(columns)
    return pd.DataFrame(base)


def write(tmp_path: Path, frame: pd.DataFrame, name: str = "events.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_valid_tables_load_with_string_ids(tmp_path: Path, items_csv: Path) -> None:
    data = load_tables(write(tmp_path, events(user_id=[1, 1, 2])), items_csv)
    assert list(data.interactions["user_id"]) == ["1", "1", "2"]
    assert data.interactions["timestamp"].dtype == "float64"


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"nope\.csv"):
        load_tables(tmp_path / "nope.csv")


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, events().drop(columns=["item_id"]))
    with pytest.raises(MissingColumnError, match=r"events\.csv.*'item_id'"):
        load_tables(path)


def test_unparseable_timestamp_names_row(tmp_path: Path) -> None:
    path = write(tmp_path, events(timestamp=["2024-01-01", "not a time", "2024-01-03"]))
    with pytest.raises(InvalidValueError, match=r"events\.csv.*'timestamp'.*row 1.*not a time"):
        load_tables(path)


def test_date_strings_are_parsed(tmp_path: Path) -> None:
    path = write(tmp_path, events(timestamp=["2024-01-01", "2024-01-02T10:00:00", "2024-01-03"]))
    times = load_tables(path).interactions["timestamp"]
    assert times.is_monotonic_increasing and times.iloc[0] == pd.Timestamp("2024-01-01").timestamp()


def test_nan_id_names_column_and_row(tmp_path: Path) -> None:
    path = write(tmp_path, events(item_id=["a", None, "c"]))
    with pytest.raises(InvalidValueError, match=r"events\.csv.*'item_id'.*row 1"):
        load_tables(path)


def test_duplicate_item_id_names_the_id(tmp_path: Path) -> None:
    items = write(tmp_path, pd.DataFrame({"item_id": ["a", "b", "a"]}), "items.csv")
    with pytest.raises(DuplicateIdError, match=r"items\.csv.*'a'.*rows \[0, 2\]"):
        load_tables(write(tmp_path, events()), items)


def test_unknown_item_is_an_error_by_default(tmp_path: Path, items_csv: Path) -> None:
    path = write(tmp_path, events(item_id=["a", "zz", "c"]))
    with pytest.raises(UnknownIdError, match=r"events\.csv.*row 1.*'zz'"):
        load_tables(path, items_csv)


def test_unknown_item_can_be_dropped_with_a_count(
    tmp_path: Path, items_csv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, events(item_id=["a", "zz", "zz"]))
    with caplog.at_level(logging.WARNING):
        data = load_tables(path, items_csv, unknown_items="drop")
    assert list(data.interactions["item_id"]) == ["a"]
    assert "dropped 2 interaction(s) with 1 item id(s)" in caplog.text


def test_empty_table_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, events().iloc[:0])
    with pytest.raises(EmptyTableError, match=r"events\.csv.*empty"):
        load_tables(path)


def test_negative_weight_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidValueError, match=r"'weight'.*row 2"):
        load_tables(events(weight=[1.0, 2.0, -1.0]))


def test_parquet_and_dataframe_sources(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    events().to_parquet(path)
    assert len(load_tables(path).interactions) == 3
    assert len(load_tables(events()).interactions) == 3


def test_datetime_columns_become_epoch_seconds() -> None:
    frame = events(timestamp=pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"]))
    seconds = load_tables(frame).interactions["timestamp"].tolist()
    assert seconds[0] == pd.Timestamp("2024-01-01", tz="UTC").timestamp()
    assert seconds[1] - seconds[0] == 86_400


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, float("inf"), 1.0], "'weight' is not finite at row 1"),
        ([1.0, float("nan"), 1.0], "'weight' is not a number at row 1"),
        ([0.0, 0.0, 0.0], "'weight' is zero on every row"),
    ],
)
def test_non_finite_and_all_zero_weights_are_rejected(
    tmp_path: Path, weights: list[float], message: str
) -> None:
    with pytest.raises(InvalidValueError, match=message):
        load_tables(events(weight=weights))


def test_column_mapping_renames_every_table(tmp_path: Path) -> None:
    raw = events().rename(columns={"user_id": "customer_id", "item_id": "sku", "timestamp": "ts"})
    items = pd.DataFrame({"sku": ["a", "b", "c"], "genre": ["x", "y", "x"]})
    data = load_tables(
        raw, items, columns={"user_id": "customer_id", "item_id": "sku", "timestamp": "ts"}
    )
    assert list(data.interactions["user_id"]) == ["u1", "u1", "u2"]
    assert list(data.items["item_id"]) == ["a", "b", "c"]
    with pytest.raises(MissingColumnError, match="cannot map"):
        load_tables(raw, columns={"customer": "customer_id"})


def test_interactions_without_timestamps_take_file_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = events().drop(columns=["timestamp"])
    with caplog.at_level(logging.WARNING):
        data = load_tables(raw)
    assert list(data.interactions["timestamp"]) == [0.0, 1.0, 2.0]
    assert "file order" in caplog.text
