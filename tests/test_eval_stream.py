"""Evaluation that streams users: pieces of an EvalSource make up the whole set, and
metrics summed over pieces are the whole set's."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest

from towers.data.eval_sets import EvalSource
from towers.data.prepare import FeatureSettings, PreparedData, prepare_data
from towers.data.schema import ITEM_ID, TIMESTAMP, RawData
from towers.data.split import item_order_key, make_split, prepare_interactions
from towers.evaluation.ranking import (
    evaluate_popularity,
    evaluate_stream,
    evaluate_vectors,
    popularity_scorer,
    vector_scorer,
)


@pytest.fixture
def prepared(tiny_data: RawData) -> PreparedData:
    split = make_split(prepare_interactions(tiny_data.interactions))
    return prepare_data(tiny_data, split, FeatureSettings(history_length=6))


def user_vectors_of(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """A fixed, input-dependent embedding (no model needed)."""
    history = inputs["history"].astype(np.float64)
    rng = np.random.default_rng(0)
    return np.tanh(history @ rng.normal(size=(history.shape[1], 8)) / 50.0)


def item_vectors_of(n_items: int) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n_items, 8))


def test_pieces_make_up_the_whole_set(prepared: PreparedData) -> None:
    source = prepared.test_source
    whole = source.materialise()
    bounds = [0, 1, 7, 30, source.n_users]
    pieces = [source.materialise(lo, hi) for lo, hi in itertools.pairwise(bounds)]
    assert np.array_equal(np.concatenate([p.user_ids for p in pieces]), whole.user_ids)
    for name, values in whole.user_inputs.items():
        assert np.array_equal(np.concatenate([p.user_inputs[name] for p in pieces]), values)
    offsets = bounds[:-1]
    for field in ("exclude", "target"):
        users = np.concatenate(
            [getattr(p, f"{field}_users") + lo for p, lo in zip(pieces, offsets, strict=True)]
        )
        items = np.concatenate([getattr(p, f"{field}_items") for p in pieces])
        assert np.array_equal(users, getattr(whole, f"{field}_users"))
        assert np.array_equal(items, getattr(whole, f"{field}_items"))


def test_one_piece_gives_the_whole_sets_metrics_to_the_bit(prepared: PreparedData) -> None:
    items = item_vectors_of(prepared.n_items)
    whole = prepared.test
    expected = evaluate_vectors(user_vectors_of(whole.user_inputs), items, whole, (5, 20))
    scorer = vector_scorer(user_vectors_of, items)
    assert evaluate_stream(prepared.test_source, scorer, len(items), (5, 20)) == expected
    assert evaluate_popularity(prepared.test_source, (5, 20)) == evaluate_popularity(whole, (5, 20))


def test_many_pieces_give_the_same_metrics(prepared: PreparedData) -> None:
    items = item_vectors_of(prepared.n_items)
    scorer = vector_scorer(user_vectors_of, items)
    source = prepared.validation_source
    whole = evaluate_stream(source, scorer, len(items), (5, 20))
    streamed = evaluate_stream(source, scorer, len(items), (5, 20), users_per_piece=7)
    assert streamed.keys() == whole.keys()
    for name, value in whole.items():
        assert streamed[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    popular = evaluate_stream(source, popularity_scorer, len(items), (5,), users_per_piece=3)
    assert popular == pytest.approx(evaluate_popularity(prepared.validation, (5,)))


def test_max_users_scores_the_first_users(prepared: PreparedData) -> None:
    items = item_vectors_of(prepared.n_items)
    first = prepared.test_source.materialise(0, 10)
    expected = evaluate_vectors(user_vectors_of(first.user_inputs), items, first, (5,))
    scorer = vector_scorer(user_vectors_of, items)
    got = evaluate_stream(prepared.test_source, scorer, len(items), (5,), max_users=10)
    assert got == expected and got["users"] <= 10


def pairs(users: np.ndarray, items: np.ndarray, user_ids: np.ndarray) -> list[tuple[str, int]]:
    """(user id, catalogue row) pairs, in sorted order."""
    return sorted(zip(user_ids[users].tolist(), items.tolist(), strict=True))


def test_rows_in_any_order_give_the_same_set(tiny_data: RawData, prepared: PreparedData) -> None:
    split = prepared.split
    rng = np.random.default_rng(5)

    def shuffled(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.take(rng.permutation(len(frame)))

    ordered = EvalSource(
        split.train, split.test, prepared.catalogue, tiny_data.users, prepared.encoders
    ).materialise()
    # a user's known rows keep their order (time, then the tie-break), users interleave
    mixed = shuffled(split.train)
    mixed = mixed.assign(key=item_order_key(mixed[ITEM_ID]))
    known = mixed.sort_values([TIMESTAMP, "key"], kind="stable").drop(columns="key")
    got = EvalSource(
        known, shuffled(split.test), prepared.catalogue, tiny_data.users, prepared.encoders
    ).materialise()
    assert sorted(got.user_ids) == sorted(ordered.user_ids)
    order = pd.Index(got.user_ids).get_indexer(ordered.user_ids)
    for name, values in ordered.user_inputs.items():
        assert np.array_equal(got.user_inputs[name][order], values), name
    for kind in ("exclude", "target"):
        expected = pairs(
            *(getattr(ordered, f"{kind}_{f}") for f in ("users", "items")), ordered.user_ids
        )
        found = pairs(*(getattr(got, f"{kind}_{f}") for f in ("users", "items")), got.user_ids)
        assert found == expected, kind
    assert np.array_equal(got.popularity, ordered.popularity)


def test_lists_longer_than_the_catalogue_are_padded_not_garbage(
    prepared: PreparedData,
) -> None:
    first = prepared.test_source.materialise(0, 5)
    n_items = 3
    items = item_vectors_of(n_items)
    clipped = dataclasses.replace(
        first,
        exclude_users=first.exclude_users[:0],
        exclude_items=first.exclude_items[:0],
        target_items=first.target_items % n_items,
        popularity=first.popularity[:n_items],
    )
    metrics = evaluate_vectors(user_vectors_of(first.user_inputs), items, clipped, (1, 5))
    assert 0 <= metrics["recall@5"] <= 1 and metrics["coverage@5"] == 1.0
    assert evaluate_popularity(clipped, (1, 5))["coverage@5"] == 1.0


def test_pieces_read_user_attributes_as_the_whole_table_gives_them(
    tiny_data: RawData,
) -> None:
    """A piece looks its users up among their own rows of the user table: the same inputs
    as looking them up in the whole table, users absent from it included (unknown)."""
    from towers.data.eval_sets import encode_users

    assert tiny_data.users is not None and len(tiny_data.users.columns) > 1
    split = make_split(prepare_interactions(tiny_data.interactions))
    data = prepare_data(tiny_data, split, FeatureSettings(history_length=6))
    source = data.test_source
    absent = set(source.user_ids[[2, 9, 10]])  # three scored users lose their attributes
    source.users = tiny_data.users.loc[~tiny_data.users["user_id"].isin(absent)]
    source.users = source.users.sample(frac=1.0, random_state=0)  # in another order
    fresh = type(source)(split.train, split.test, data.catalogue, source.users, data.encoders)
    for lo, hi in ((0, 5), (5, 12), (12, fresh.n_users)):
        piece = fresh.materialise(lo, hi)
        whole_table = encode_users(
            data.encoders, fresh.users, piece.user_ids, piece.user_inputs["history"]
        )
        assert piece.user_inputs.keys() == whole_table.keys()
        for name, values in whole_table.items():
            np.testing.assert_array_equal(piece.user_inputs[name], values, err_msg=name)
    # the absent users really lost their attributes: the full table gives them others
    piece = fresh.materialise(0, fresh.n_users)
    full = encode_users(
        data.encoders, tiny_data.users, piece.user_ids, piece.user_inputs["history"]
    )
    differs = (piece.user_inputs["user_cat"] != full["user_cat"]).any(axis=1)
    assert set(piece.user_ids[differs]) == absent
