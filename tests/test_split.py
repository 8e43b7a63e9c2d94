"""The EVALUATION.md split: disjoint, temporal per user, the exact sizes, deterministic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from towers.data.schema import RawData
from towers.data.split import (
    cold_item_holdout,
    make_split,
    prepare_interactions,
    temporal_holdout,
)


def test_repeated_pairs_keep_the_earliest() -> None:
    events = pd.DataFrame(
        {"user_id": ["u", "u", "u"], "item_id": ["a", "a", "b"], "timestamp": [5.0, 1.0, 3.0]}
    )
    kept = prepare_interactions(events)
    assert list(zip(kept["item_id"], kept["timestamp"], strict=True)) == [("a", 1.0), ("b", 3.0)]


def test_holdout_sizes_follow_the_rule(tiny_data: RawData) -> None:
    events = prepare_interactions(tiny_data.interactions)
    kept, held = temporal_holdout(events, 0.2, min_interactions=5)
    sizes = events.groupby("user_id").size()
    held_sizes = held.groupby("user_id").size().reindex(sizes.index, fill_value=0)
    expected = np.where(sizes >= 5, np.maximum(1, np.round(0.2 * sizes)), 0)
    np.testing.assert_array_equal(held_sizes.to_numpy(), expected)
    assert len(kept) + len(held) == len(events)


def test_split_is_disjoint_and_temporal(tiny_data: RawData) -> None:
    split = make_split(prepare_interactions(tiny_data.interactions), seed=1)
    key = ["user_id", "item_id"]
    parts = {"fit": split.fit, "validation": split.validation, "test": split.test}
    for a in parts:
        for b in parts:
            if a < b:
                assert parts[a].merge(parts[b], on=key).empty, (a, b)
    assert len(split.fit) + len(split.validation) == len(split.train)
    last_train = split.train.groupby("user_id")["timestamp"].max()
    first_test = split.test.groupby("user_id")["timestamp"].min()
    assert (first_test >= last_train.reindex(first_test.index)).all()
    last_fit = split.fit.groupby("user_id")["timestamp"].max()
    first_val = split.validation.groupby("user_id")["timestamp"].min()
    assert (first_val >= last_fit.reindex(first_val.index)).all()


def test_ties_are_broken_by_integer_item_id() -> None:
    # Same timestamp: "10" sorts after "9" as an integer (as a string it would not).
    events = pd.DataFrame(
        {
            "user_id": ["u"] * 5,
            "item_id": ["1", "2", "3", "10", "9"],
            "timestamp": [1.0, 2.0, 3.0, 4.0, 4.0],
        }
    )
    _, held = temporal_holdout(prepare_interactions(events), 0.2)
    assert list(held["item_id"]) == ["10"]


def test_users_with_few_interactions_stay_in_train() -> None:
    events = pd.DataFrame(
        {"user_id": ["u"] * 4, "item_id": list("abcd"), "timestamp": [1.0, 2.0, 3.0, 4.0]}
    )
    kept, held = temporal_holdout(prepare_interactions(events), 0.2)
    assert len(kept) == 4 and held.empty


def test_split_is_identical_under_the_same_seed(tiny_data: RawData) -> None:
    events = prepare_interactions(tiny_data.interactions)
    for cold in (False, True):
        first = make_split(events, cold_items=cold, seed=7)
        second = make_split(events, cold_items=cold, seed=7)
        pd.testing.assert_frame_equal(first.test, second.test)
        pd.testing.assert_frame_equal(first.validation, second.validation)


def test_cold_items_leave_train_entirely(tiny_data: RawData) -> None:
    events = prepare_interactions(tiny_data.interactions)
    split = make_split(events, cold_items=True, cold_fraction=0.1, seed=7)
    n_items = events["item_id"].nunique()
    assert len(split.cold_items) == round(0.1 * n_items)
    assert not split.train["item_id"].isin(set(split.cold_items)).any()
    assert split.test["item_id"].isin(set(split.cold_items)).all()
    assert len(split.test) == events["item_id"].isin(set(split.cold_items)).sum()
    other = make_split(events, cold_items=True, cold_fraction=0.1, seed=8)
    assert set(other.cold_items) != set(split.cold_items)


def test_cold_validation_holds_out_items_of_train_the_same_way(tiny_data: RawData) -> None:
    events = prepare_interactions(tiny_data.interactions)
    split = make_split(events, cold_items=True, cold_fraction=0.1, seed=7)
    validation_items = set(split.validation["item_id"])
    assert len(validation_items) == round(0.1 * split.train["item_id"].nunique())
    assert not split.fit["item_id"].isin(validation_items).any()
    assert not validation_items & set(split.cold_items)
    assert len(split.fit) + len(split.validation) == len(split.train)


def test_cold_validation_ranks_only_trains_items(tiny_data: RawData) -> None:
    """Validation mirrors test: test ranks every item with its held-out items unseen;
    validation ranks train's items with its own held-out items unseen, and the test's
    held-out items (validation's future) are no one's candidate."""
    from towers.data.prepare import FeatureSettings, prepare_data
    from towers.evaluation.ranking import top_k_excluding

    split = make_split(prepare_interactions(tiny_data.interactions), cold_items=True, seed=7)
    data = prepare_data(tiny_data, split, FeatureSettings(history_length=5))
    test_cold = np.flatnonzero(data.catalogue["item_id"].isin(set(split.cold_items)))
    assert sorted(data.validation.unavailable_items) == sorted(test_cold)
    assert len(data.test.unavailable_items) == 0
    # scores that put the test's held-out items first: validation never ranks them
    scores = np.zeros(data.n_items)
    scores[test_cold] = 1.0
    eval_set = data.validation
    top = top_k_excluding(
        lambda lo, hi: np.broadcast_to(scores, (hi - lo, data.n_items)),
        eval_set.n_users,
        10,
        eval_set.exclude_users,
        eval_set.exclude_items,
        unavailable_items=eval_set.unavailable_items,
    )
    assert not set(top.ravel()) & set(test_cold)
    warm = make_split(prepare_interactions(tiny_data.interactions), seed=7)
    assert len(prepare_data(tiny_data, warm, FeatureSettings()).validation.unavailable_items) == 0


def test_split_seed_fixes_the_cold_items_whatever_the_model_seed() -> None:
    from tests.conftest import compose_config
    from towers.pipeline import split_settings

    follows = split_settings(compose_config(["split.cold_items=true", "seed=5"]))
    assert follows["seed"] == 5
    fixed = split_settings(compose_config(["split.cold_items=true", "seed=5", "split.seed=42"]))
    assert fixed["seed"] == 42 and fixed["cold_items"] is True


def test_split_parts_follow_both_rules_in_one_pass(tiny_data: RawData) -> None:
    """``make_split``'s parts, labelled in one pass, are the two hold-outs applied one
    after the other (test from all events, then validation from the rest; temporal or
    cold-item), and without ``keep_train`` the same three parts with the same counts."""
    events = prepare_interactions(tiny_data.interactions)
    for min_interactions in (1, 3, 5, 12):
        split = make_split(events, min_interactions=min_interactions)
        train, test = temporal_holdout(events, 0.2, min_interactions)
        fit, validation = temporal_holdout(train, 0.1, min_interactions)
        for ours, theirs in ((split.train, train), (split.fit, fit), (split.test, test)):
            pd.testing.assert_frame_equal(ours, theirs)
        pd.testing.assert_frame_equal(split.validation, validation)
        lean = make_split(events, min_interactions=min_interactions, keep_train=False)
        assert lean.train.empty and lean.stats() == split.stats()
        pd.testing.assert_frame_equal(lean.fit, split.fit)
    cold = make_split(events, cold_items=True, cold_fraction=0.1, seed=7)
    train, test, test_items = cold_item_holdout(events, 0.1, 7)
    fit, validation, _ = cold_item_holdout(train, 0.1, 8)
    for ours, theirs in zip(
        (cold.train, cold.fit, cold.validation, cold.test),
        (train, fit, validation, test),
        strict=True,
    ):
        pd.testing.assert_frame_equal(ours, theirs)
    assert cold.cold_items.tolist() == test_items.tolist()


def test_blocks_of_whole_users_give_what_one_pass_gives(
    tiny_data: RawData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order check and the repeated pairs, looked at a few rows (whole users) at a
    time, give what one pass over every row gives, sorted input or not."""
    from towers.data import split as split_module

    rng = np.random.default_rng(0)
    events = tiny_data.interactions
    repeats = events.sample(300, random_state=0).assign(timestamp=lambda t: t["timestamp"] + 1)
    shuffled = pd.concat([events, repeats], ignore_index=True).sample(frac=1, random_state=1)
    shuffled["user_id"] = shuffled["user_id"].astype("category")
    expected = prepare_interactions(shuffled)
    for chunk in (1, 7, int(rng.integers(20, 200))):
        monkeypatch.setattr(split_module, "ORDER_CHUNK", chunk)
        pd.testing.assert_frame_equal(prepare_interactions(shuffled), expected)
        pd.testing.assert_frame_equal(prepare_interactions(expected), expected)


def test_labels_a_few_rows_at_a_time_and_unsorted_input(
    tiny_data: RawData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labelling in chunks of any size gives the same parts, and raw rows in any order
    are sorted first (the same split as from the sorted events)."""
    from towers.data import split as split_module

    events = prepare_interactions(tiny_data.interactions)
    expected = make_split(events)
    for chunk in (1, 7, 1000):
        monkeypatch.setattr(split_module, "LABEL_CHUNK", chunk)
        split = make_split(events)
        for name in ("train", "fit", "validation", "test"):
            pd.testing.assert_frame_equal(getattr(split, name), getattr(expected, name))
    shuffled = make_split(events.sample(frac=1, random_state=3))
    for name in ("train", "fit", "validation", "test"):
        pd.testing.assert_frame_equal(getattr(shuffled, name), getattr(expected, name))
