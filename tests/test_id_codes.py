"""Ids as integer codes from the first read: the same split, encoders and samples as
string ids, and no string column per event in the hot tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towers.data.ids import encode_id_column, id_codes, positions_in
from towers.data.readers import load_tables
from towers.data.schema import validate_interactions
from towers.data.split import make_split, prepare_interactions
from twotower.encoding import Vocabulary
from twotower.errors import InvalidValueError


def random_events(seed: int, n: int = 4000, string_items: bool = True) -> pd.DataFrame:
    """Events with repeated pairs, ties in time, ids whose string and numeric orders
    differ (u10 < u9), in no particular row order."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 60, n)
    return pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in rng.integers(0, 90, n)],
            "item_id": [f"i{i}" for i in items] if string_items else items,
            "timestamp": rng.integers(0, 40, n).astype(float),
        }
    )


def split_with_pandas(events: pd.DataFrame, fraction: float, min_n: int) -> pd.DataFrame:
    """The EVALUATION.md hold-out written the plain pandas way, on string ids."""
    frame = events.assign(
        user_id=events["user_id"].astype(str),
        item_id=events["item_id"].astype(str),
    )
    numeric = frame["item_id"].str.fullmatch(r"\d+").all()
    frame["order"] = frame["item_id"].astype(int) if numeric else frame["item_id"]
    frame = frame.sort_values(["user_id", "timestamp", "order"], kind="mergesort")
    frame = frame.drop_duplicates(["user_id", "item_id"], keep="first")
    sizes = frame.groupby("user_id")["item_id"].transform("size")
    rank = frame.groupby("user_id").cumcount()
    held = np.where(sizes >= min_n, np.maximum(1, np.round(fraction * sizes)), 0)
    return frame.assign(held=rank >= sizes - held)


@pytest.mark.parametrize("string_items", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_split_on_codes_is_the_split_on_strings(seed: int, string_items: bool) -> None:
    raw = random_events(seed, string_items=string_items)
    events = prepare_interactions(validate_interactions(raw, "events"))
    assert isinstance(events["user_id"].dtype, pd.CategoricalDtype)
    split = make_split(events, test_fraction=0.2, validation_fraction=0.1, min_interactions=5)
    expected = split_with_pandas(raw, 0.2, 5)

    def rows(frame: pd.DataFrame) -> list[tuple[str, str, float]]:
        return list(
            zip(
                frame["user_id"].astype(str),
                frame["item_id"].astype(str),
                frame["timestamp"],
                strict=True,
            )
        )

    assert rows(split.train) == rows(expected.loc[~expected["held"]])
    assert rows(split.test) == rows(expected.loc[expected["held"]])


def test_ids_become_codes_of_sorted_strings() -> None:
    column = pd.Series([10.0, 9.0, 10.0, 2.0], name="user_id")
    encoded = encode_id_column(column, "events.csv", "user_id")
    assert list(encoded.cat.categories) == ["10", "2", "9"]  # as strings sort
    assert list(encoded.astype(str)) == ["10", "9", "10", "2"]  # integral floats lose .0
    mixed = encode_id_column(pd.Series([1, "1", "a"], dtype=object), "t", "item_id")
    assert list(mixed.cat.codes) == [0, 0, 1]  # 1 and "1" are one id
    codes, ids = id_codes(pd.Series(["b", "a", "b"]))
    assert list(ids[codes]) == ["b", "a", "b"] and list(ids) == ["a", "b"]
    lookup = positions_in(pd.Index(["x", "b"]), encoded.astype(str).astype("category"))
    assert list(lookup) == [-1, -1, -1, -1]


def test_a_missing_id_names_its_row() -> None:
    with pytest.raises(InvalidValueError, match=r"events.csv: column 'item_id' .* at row 2"):
        encode_id_column(pd.Series(["a", "b", None]), "events.csv", "item_id")


def test_vocabulary_of_codes_is_the_vocabulary_of_strings() -> None:
    values = pd.Series(["b", "a", "c", "b", "a", "b", None, "d"], dtype=object)
    coded = values.astype("category")
    coded = coded.cat.add_categories(["never"])  # a category no row uses
    for min_count in (1, 2):
        assert Vocabulary.fit(coded, min_count).values == Vocabulary.fit(values, min_count).values
    vocab = Vocabulary.fit(values, 1)
    assert list(vocab.encode(coded)) == list(vocab.encode(values))


def test_sharded_interactions_are_read_as_codes(tmp_path: Path) -> None:
    raw = random_events(3)
    shards = tmp_path / "events"
    shards.mkdir()
    for number, lo in enumerate(range(0, len(raw), 1500)):
        part = pa.Table.from_pandas(raw.iloc[lo : lo + 1500], preserve_index=False)
        pq.write_table(part, shards / f"part-{number}.parquet")
    data = load_tables(shards)
    events = data.interactions
    for column in ("user_id", "item_id"):
        assert isinstance(events[column].dtype, pd.CategoricalDtype)
        assert list(events[column].astype(str)) == list(raw[column])
    # four-byte codes, no Python string per row
    per_row = events[["user_id", "item_id"]].memory_usage(deep=True, index=False).sum() / len(raw)
    assert per_row < 12
    expected = prepare_interactions(validate_interactions(raw, "frame"))
    got = prepare_interactions(events)
    pd.testing.assert_frame_equal(got.astype(str), expected.astype(str))


def test_tie_break_looks_only_at_the_items_left_after_filtering() -> None:
    # once item "x" (rated 1) is filtered out, every item id left is an integer: 2 < 10
    events = pd.DataFrame(
        {
            "user_id": ["u"] * 4 + ["v"],
            "item_id": ["2", "10", "3", "4", "x"],
            "timestamp": [5.0, 5, 1, 2, 1],
            "rating": [5, 5, 5, 5, 1],
        }
    )
    kept = prepare_interactions(validate_interactions(events, "events"), min_rating=4)
    assert list(kept["item_id"].astype(str)) == ["3", "4", "2", "10"]


def test_a_categorical_in_another_order_is_encoded_again() -> None:
    items = pd.Categorical(["b", "a", "c", "d"], categories=["d", "c", "b", "a"])
    events = pd.DataFrame({"user_id": ["u"] * 4, "item_id": items, "timestamp": [1.0] * 4})
    kept = prepare_interactions(events)
    assert list(kept["item_id"].astype(str)) == ["a", "b", "c", "d"]
    codes, ids = id_codes(pd.Series(items))
    assert list(ids) == ["a", "b", "c", "d"] and list(ids[codes]) == ["b", "a", "c", "d"]


def test_an_all_missing_categorical_encodes_to_out_of_vocabulary() -> None:
    vocab = Vocabulary(["a"])
    empty = pd.Series(pd.Categorical([None] * 300))
    assert set(vocab.encode(empty)) == {vocab.encode(["zzz"])[0]}


def test_a_single_parquet_file_reads_as_pandas_wrote_it(tmp_path: Path) -> None:
    folder = tmp_path / "weight=0"  # a key=value folder above one file is not a column
    folder.mkdir()
    frame = pd.DataFrame(
        {"user_id": ["a", "b", "c"], "item_id": [1, 2, 2], "timestamp": [1.0, 2.0, 3.0]},
        index=[7, 8, 9],  # pandas keeps the index in the file's metadata
    )
    frame.to_parquet(folder / "events.parquet")
    events = load_tables(folder / "events.parquet").interactions
    assert list(events.columns) == ["user_id", "item_id", "timestamp"]
    assert list(events["item_id"].astype(str)) == ["1", "2", "2"]
