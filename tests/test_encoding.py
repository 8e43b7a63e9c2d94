"""Feature encoders: fit -> save -> load round trip, OOV slot, bags, numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twotower.encoding import (
    OOV_INDEX,
    PAD_INDEX,
    EntityEncoder,
    FeatureColumns,
    FeatureEncoders,
    HashedTextEncoder,
    MultiHotEncoder,
    NumericEncoder,
    Vocabulary,
)


def make_encoders() -> tuple[FeatureEncoders, pd.DataFrame, pd.DataFrame]:
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "kind": ["x", "y", "x", None],
            "genres": ["g1|g2", "g2", "", "g3|g1|g2"],
            "price": [1.0, 3.0, np.nan, 5.0],
        }
    )
    users = pd.DataFrame({"user_id": ["u1", "u2"], "country": ["fr", "de"], "age": [20, 40]})
    encoders = FeatureEncoders(
        items=EntityEncoder.fit(
            "item", ["a", "a", "b", "c"], items, FeatureColumns(["kind"], ["genres"], ["price"])
        ),
        users=EntityEncoder.fit(
            "user", ["u1", "u2"], users, FeatureColumns(["country"], [], ["age"])
        ),
        history_length=3,
    )
    return encoders, items, users


def test_round_trip_gives_identical_encodings(tmp_path: Path) -> None:
    encoders, items, users = make_encoders()
    encoders.save(tmp_path / "encoders.json")
    loaded = FeatureEncoders.load(tmp_path / "encoders.json")
    before, after = encoders.item_inputs(items), loaded.item_inputs(items)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    histories = [["a", "b"], ["zz", "c", "a", "b"]]
    np.testing.assert_array_equal(
        encoders.encode_histories(histories), loaded.encode_histories(histories)
    )
    u1 = encoders.user_inputs(["u1", "u9"], encoders.encode_histories(histories), users)
    u2 = loaded.user_inputs(["u1", "u9"], loaded.encode_histories(histories), users)
    for name in u1:
        np.testing.assert_array_equal(u1[name], u2[name])


def test_unknown_values_map_to_the_oov_slot() -> None:
    vocab = Vocabulary.fit(["a", "a", "b"])
    assert vocab.values == ["a", "b"]
    np.testing.assert_array_equal(
        vocab.encode(["a", "b", "new", None]), [2, 3, OOV_INDEX, OOV_INDEX]
    )


def test_min_count_sends_rare_ids_to_oov() -> None:
    vocab = Vocabulary.fit(["a", "a", "b"], min_count=2)
    np.testing.assert_array_equal(vocab.encode(["a", "b"]), [2, OOV_INDEX])


def test_multi_hot_bags_pad_and_truncate() -> None:
    column = pd.Series(["g1|g2", "", None, "g3|g1|g2|g4", ["g2", "g1"]])
    encoder = MultiHotEncoder.fit(column, max_tokens=3)
    encoded = encoder.encode(column)
    assert encoded.shape == (5, 3)
    assert (encoded[1] == PAD_INDEX).all() and (encoded[2] == PAD_INDEX).all()
    g = {v: i + 2 for i, v in enumerate(encoder.vocabulary.values)}
    assert list(encoded[0]) == [g["g1"], g["g2"], PAD_INDEX]
    assert list(encoded[3]) == [g["g3"], g["g1"], g["g2"]]
    assert list(encoded[4]) == [g["g2"], g["g1"], PAD_INDEX]
    assert encoder.encode(pd.Series(["unseen"]))[0, 0] == OOV_INDEX


def test_numeric_is_standardised_with_nan_as_mean() -> None:
    encoder = NumericEncoder.fit(pd.Series([1.0, 3.0, np.nan]))
    np.testing.assert_allclose(encoder.encode(pd.Series([1.0, 3.0, np.nan, 2.0])), [-1, 1, 0, 0])


def test_histories_keep_the_most_recent_items_last() -> None:
    encoders, _, _ = make_encoders()
    ids = encoders.items.ids
    encoded = encoders.encode_histories([["a"], ["a", "b", "c", "zz"], []])
    assert list(encoded[0]) == [PAD_INDEX, PAD_INDEX, ids.encode(["a"])[0]]
    assert list(encoded[1]) == [*ids.encode(["b", "c"]), OOV_INDEX]
    assert (encoded[2] == PAD_INDEX).all()


def test_unknown_user_attributes_are_missing_not_errors() -> None:
    encoders, _, users = make_encoders()
    rows = users.set_index("user_id").reindex(["u9"]).reset_index()
    inputs = encoders.user_inputs(["u9"], encoders.encode_histories([[]]), rows)
    assert inputs["user_id"][0] == OOV_INDEX
    assert inputs["user_cat"][0, 0] == OOV_INDEX
    assert inputs["user_num"][0, 0] == 0.0


def test_text_min_count_keeps_words_of_enough_seen_items(tmp_path: Path) -> None:
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "new"],
            "title": ["Star Wars", "Star Trek II", "Alien II", "Star Wars: Alien Part II"],
        }
    )
    columns = FeatureColumns(text=["title"])
    # counted over items seen in training only: "new" (never in id_values) cannot make
    # "wars" or "alien" frequent
    encoder = EntityEncoder.fit("item", ["a", "b", "c"], items, columns, text_min_count=2)
    assert encoder.text["title"].known_words == frozenset({"star", "ii"})
    every_word = EntityEncoder.fit("item", ["a", "b", "c"], items, columns)
    assert every_word.text["title"].known_words is None
    bags = encoder.transform(items["item_id"].tolist(), items)["item_bag"]
    hashed = every_word.transform(items["item_id"].tolist(), items)["item_bag"]
    star, ii = hashed[1, 0], hashed[1, 2]
    # kept words move up to the first positions; rare and unseen words add nothing
    np.testing.assert_array_equal(bags[3], [star, ii] + [PAD_INDEX] * 6)
    np.testing.assert_array_equal(bags[2], [ii] + [PAD_INDEX] * 7)
    assert (hashed[3] != PAD_INDEX).sum() == 5
    loaded = HashedTextEncoder.from_dict(encoder.text["title"].to_dict())
    assert loaded == encoder.text["title"]
    assert HashedTextEncoder.from_dict({"buckets": 8, "max_tokens": 2}).known_words is None


@pytest.mark.parametrize("with_dict", [True, False])
def test_few_value_lookups_equal_bulk_ones_with_or_without_the_dict(
    monkeypatch: pytest.MonkeyPatch, with_dict: bool
) -> None:
    """Serving's few-value lookups (a dict for vocabularies up to LOOKUP_DICT_LIMIT,
    pandas' hash table past it) give what encoding a whole column gives."""
    from twotower.encoding import vocabulary

    monkeypatch.setattr(vocabulary, "LOOKUP_DICT_LIMIT", 10**6 if with_dict else 0)
    vocab = Vocabulary.fit(["a", "b", "b", "", "7", "7", "x\x00missing"])
    assert (vocab._lookup is not None) == with_dict
    values = ["b", "", "7", 7, 7.0, None, float("nan"), "\x00missing", "zzz", "a", "x\x00missing"]
    few = vocab.encode(values)
    bulk = vocab.encode(pd.Series(values * 30, dtype=object))[: len(values)]
    assert few.tolist() == bulk.tolist()
    assert few[0] >= 2 and few[1] >= 2 and few[2] == few[3]
    assert few[5] == few[6] == few[7] == few[8] == 1  # missing, unknown: the OOV slot


def test_vocabulary_counts_and_encodes_categoricals_a_few_codes_at_a_time() -> None:
    """Counting a Categorical's codes in chunks (missing values skipped) fits the
    vocabulary that plain values fit; ``encode(dtype=np.int32)`` gives the same indices."""
    from twotower.encoding import vocabulary as vocabulary_module

    rng = np.random.default_rng(0)
    values = pd.Series(rng.choice(["a", "b", "c", None], 1000, p=[0.5, 0.3, 0.1, 0.1]))
    categorical = values.astype("category")
    counts = vocabulary_module.code_counts(categorical.cat.codes.to_numpy(), 3, chunk=7)
    assert counts.tolist() == [int((values == v).sum()) for v in ("a", "b", "c")]
    fitted = Vocabulary.fit(categorical)
    assert fitted.values == Vocabulary.fit(values.dropna().tolist()).values
    wide = fitted.encode(categorical)
    narrow = fitted.encode(categorical, dtype=np.int32)
    assert narrow.dtype == np.int32 and wide.dtype == np.int64
    np.testing.assert_array_equal(narrow, wide)
    np.testing.assert_array_equal(fitted.encode(values, dtype=np.int32), wide)
