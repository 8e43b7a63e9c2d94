"""Catalogue edits through Retriever: upsert replaces an item, a removed id comes back,
answers say what served each user, and the repr says what is loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from retrieval import Retriever
from retrieval.search import ExactCandidates, FaissCandidates, top_k
from towers.pipeline import TrainResult


@pytest.fixture
def retriever(trained: TrainResult) -> Retriever:
    return Retriever.load(trained.bundle)


def vector_of(retriever: Retriever, item_id: str) -> np.ndarray:
    catalogue = retriever.catalogue
    return catalogue.vectors[catalogue.rows_of([item_id])[0]]


def test_adding_an_existing_id_replaces_the_item(retriever: Retriever, tmp_path: Path) -> None:
    item = str(retriever.item_ids[0])
    live = retriever.catalogue.live
    before = vector_of(retriever, item)
    retriever.add_items(pd.DataFrame({"item_id": [item], "category": ["c-other"]}))
    after = vector_of(retriever, item)
    assert retriever.catalogue.live == live and not np.allclose(before, after)
    expected = retriever.embed_items(pd.DataFrame({"item_id": [item], "category": ["c-other"]}))
    np.testing.assert_allclose(after, expected[0], atol=1e-6)
    found, _ = retriever.similar_items(item, k=retriever.catalogue.live)
    assert item not in found and len(set(found)) == len(found)  # the old row is gone too
    saved = Retriever.load(retriever.save(tmp_path / "saved"))
    assert saved.catalogue.size == live and list(saved.item_ids).count(item) == 1
    np.testing.assert_allclose(vector_of(saved, item), after, atol=1e-6)


def test_a_removed_id_can_be_added_again(retriever: Retriever, trained: TrainResult) -> None:
    item = str(retriever.item_ids[1])
    user = str(trained.data.test.user_ids[0])
    assert retriever.remove_items([item]) == 1
    everything = retriever.recommend(user_id=user, k=10_000, exclude_seen=False)[0]
    assert item not in everything
    retriever.add_items(pd.DataFrame({"item_id": [item]}))
    everything = retriever.recommend(user_id=user, k=10_000, exclude_seen=False)[0]
    assert list(everything).count(item) == 1


def test_answers_say_what_served_each_user(retriever: Retriever, trained: TrainResult) -> None:
    known = str(trained.data.test.user_ids[0])
    item = str(retriever.item_ids[2])
    found = retriever.retrieve(
        [known, "stranger", "stranger", None], [None, [item], None, None], k=5
    )
    assert found.served_by == ["model", "history", "popularity", "popularity"]
    popular = np.argsort(-retriever.item_counts, kind="stable")[:5]
    assert list(found.ids[2]) == list(retriever.item_ids[popular])
    attributes = retriever.retrieve(user_features=[{"region": "r1"}], k=5)
    assert attributes.served_by == ["model"]


def test_repr_says_what_is_loaded(retriever: Retriever) -> None:
    text = repr(retriever)
    assert str(retriever.path) in text and f"items={retriever.catalogue.live}" in text
    assert f"dim={retriever.dim}" in text and "index='Flat'" in text


def test_exact_and_faiss_candidates_agree(retriever: Retriever) -> None:
    catalogue = retriever.catalogue
    queries = retriever.embed_users([str(u) for u in retriever.users.position][:8])
    assert isinstance(catalogue.index, FaissCandidates)
    exact = ExactCandidates(catalogue.vectors)
    banned = [np.array([0, 3]) for _ in range(len(queries))]
    allowed = np.ones(catalogue.size, bool)
    allowed[5] = False
    got = top_k(catalogue.index, catalogue.vectors, queries, banned, allowed, 10, {})
    want = top_k(exact, catalogue.vectors, queries, banned, allowed, 10, {})
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    assert not np.isin(got[0], [0, 3, 5]).any()
