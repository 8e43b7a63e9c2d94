"""One contract, every index type (in the style of implicit's RecommenderBaseTestMixin):
single vs batch, exclusions, filters, k beyond the catalogue, empty history, knobs,
save/load, cold-start add/remove, and agreement with exact search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from retrieval import RequestError, Retriever
from towers.pipeline import TrainResult

from .conftest import INDEXES


@pytest.fixture(params=INDEXES)
def retriever(request: pytest.FixtureRequest, bundles: dict[str, Path]) -> Retriever:
    return Retriever.load(bundles[request.param])


@pytest.fixture
def users(trained: TrainResult) -> list[str]:
    return list(trained.data.test.user_ids[:12])


def seen_by(trained: TrainResult, user: str) -> set[str]:
    train = trained.data.split.train
    return set(train.loc[train["user_id"] == user, "item_id"])


def test_manifest_records_the_index_and_its_recall(retriever: Retriever) -> None:
    index = retriever.manifest.index
    assert index.recall_k == 100 and index.ann_recall >= 0.95
    assert set(index.search_params) == set(retriever.search_params)


def test_single_and_batch_agree(retriever: Retriever, users: list[str]) -> None:
    batch_ids, batch_scores = retriever.recommend_batch(users, k=10)
    assert batch_ids.shape == (len(users), 10) and batch_scores.dtype == np.float32
    for row, user in enumerate(users):
        ids, scores = retriever.recommend(user_id=user, k=10)
        assert list(ids) == list(batch_ids[row])
        np.testing.assert_allclose(scores, batch_scores[row], rtol=1e-5, atol=1e-6)


def test_exclusions_hold(retriever: Retriever, users: list[str], trained: TrainResult) -> None:
    extra = list(retriever.item_ids[:30])
    for user in users:
        history = list(retriever.item_ids[40:45])
        ids, _ = retriever.recommend(user_id=user, history=history, exclude=extra, k=20)
        assert len(ids) == 20 and len(set(ids)) == 20
        assert not set(ids) & (seen_by(trained, user) | set(history) | set(extra))


def test_seen_items_come_back_when_asked(
    retriever: Retriever, users: list[str], trained: TrainResult
) -> None:
    user = users[0]
    ids, _ = retriever.recommend(user_id=user, k=len(retriever.item_ids), exclude_seen=False)
    assert seen_by(trained, user) & set(ids)


def test_filters_hold_and_still_fill_k(
    retriever: Retriever, users: list[str], trained: TrainResult
) -> None:
    catalogue = trained.data.catalogue.set_index("item_id")
    for user in users[:4]:
        ids, _ = retriever.recommend(user_id=user, k=5, filter={"category": {"c1", "c2"}})
        assert len(ids) == 5 and set(catalogue.loc[list(ids), "category"]) <= {"c1", "c2"}
        ids, _ = retriever.recommend(user_id=user, k=5, filter={"tags": "t3"})
        assert len(ids) == 5 and all("t3" in catalogue.loc[i, "tags"].split("|") for i in ids)


def test_unknown_filter_column_is_a_request_error(retriever: Retriever) -> None:
    with pytest.raises(RequestError, match="filter column 'colour'"):
        retriever.recommend(history=["i1"], filter={"colour": "red"})


def test_k_beyond_the_catalogue(
    retriever: Retriever, users: list[str], trained: TrainResult
) -> None:
    ids, scores = retriever.recommend(user_id=users[0], k=5000)
    expected = len(retriever.item_ids) - len(seen_by(trained, users[0]))
    assert len(set(ids)) == len(ids) <= expected and np.isfinite(scores).all()
    if retriever.manifest.index.factory == "Flat":
        assert len(ids) == expected


def test_empty_history_and_unknown_user(retriever: Retriever) -> None:
    ids, _ = retriever.recommend(history=[], k=5)
    popular, _ = retriever.recommend(user_id="nobody", k=5)
    assert list(ids) == list(popular) and len(ids) == 5
    features_only, _ = retriever.recommend(user_features={"region": "r1", "age": 30}, k=5)
    assert len(features_only) == 5


def test_search_knobs_can_be_overridden_per_request(retriever: Retriever, users: list[str]) -> None:
    knobs = retriever.search_params
    if not knobs:
        with pytest.raises(RequestError, match="do not apply"):
            retriever.recommend(user_id=users[0], search_params={"nprobe": 4})
        return
    widest = {k: {"nprobe": 64, "efSearch": 512, "k_factor": 16}[k] for k in knobs}
    ids, _ = retriever.recommend(user_id=users[0], k=10, search_params=widest)
    assert len(ids) == 10
    with pytest.raises(RequestError, match="unknown search knob"):
        retriever.recommend(user_id=users[0], search_params={"probes": 3})
    for knob in knobs:
        for bad in (0, -1, float("nan"), float("inf"), 2.5 if knob != "k_factor" else 0.5):
            with pytest.raises(RequestError, match=f"search knob {knob} must be"):
                retriever.recommend(user_id=users[0], search_params={knob: bad})


def test_agrees_with_exact_search(
    retriever: Retriever, bundles: dict[str, Path], users: list[str]
) -> None:
    exact = Retriever.load(bundles["Flat"])
    found, truth = retriever.recommend_batch(users, k=20)[0], exact.recommend_batch(users, k=20)[0]
    overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(found, truth, strict=True)])
    assert overlap >= 0.9


def test_similar_items_excludes_the_item_itself(retriever: Retriever) -> None:
    item = retriever.item_ids[3]
    ids, scores = retriever.similar_items(item, k=5)
    assert len(ids) == 5 and item not in ids and np.all(np.diff(scores) <= 1e-6)
    popular, _ = retriever.similar_items("no-such-item", k=5)
    assert len(popular) == 5


def test_save_load_round_trip(retriever: Retriever, users: list[str], tmp_path: Path) -> None:
    again = Retriever.load(retriever.save(tmp_path / "copy"))
    for user in users[:5]:
        assert list(again.recommend(user_id=user, k=10)[0]) == list(
            retriever.recommend(user_id=user, k=10)[0]
        )


def test_cold_start_add_remove_save(retriever: Retriever, users: list[str], tmp_path: Path) -> None:
    new = pd.DataFrame(
        {
            "item_id": ["new-1", "new-2"],
            "category": ["c-new", "c-new"],
            "tags": ["t1|t2", "t5"],
            "quality": [1.0, -0.5],
        }
    )
    assert retriever.add_items(new) == 2
    ids, _ = retriever.recommend(user_id=users[0], k=5, filter={"category": "c-new"})
    assert set(ids) == {"new-1", "new-2"}
    similar, _ = retriever.similar_items("new-1", k=3)
    assert len(similar) == 3
    assert retriever.remove_items(["new-2", "unknown-id"]) == 1
    ids, _ = retriever.recommend(user_id=users[0], k=5, filter={"category": "c-new"})
    assert list(ids) == ["new-1"]
    again = Retriever.load(retriever.save(tmp_path / "edited"))
    assert list(again.recommend(user_id=users[0], k=5, filter={"category": "c-new"})[0]) == [
        "new-1"
    ]
    assert again.manifest.counts.items == len(retriever.item_ids)


def test_new_item_boost_lifts_items_without_training_events(
    retriever: Retriever, bundles: dict[str, Path], users: list[str]
) -> None:
    new = pd.DataFrame(
        {"item_id": ["new-a", "new-b"], "category": ["c1", "c2"], "tags": ["t1", "t3|t4"]}
    )
    exact = Retriever.load(bundles["Flat"])
    for served in (retriever, exact):
        served.add_items(new)
    is_new = {str(i) for i, n in zip(exact.item_ids, exact.item_counts, strict=True) if n == 0}
    assert {"new-a", "new-b"} <= is_new
    plain = retriever.recommend_batch(users, k=10)
    same = retriever.recommend_batch(users, k=10, new_item_boost=0.0)
    np.testing.assert_array_equal(plain[0], same[0])
    first, scores = retriever.recommend_batch(users, k=10, new_item_boost=2.0)
    for row in first:  # cosine scores lie in [-1, 1]: a boost of 2 puts every new item first
        leading = [i for i in row if i in is_new]
        assert list(row[: len(leading)]) == leading and len(leading) == min(10, len(is_new))
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # against the exact ranking of the boosted scores over the whole catalogue
    everything, raw = exact.recommend_batch(users, k=len(exact.item_ids))
    for r, _ in enumerate(users):
        valid = [j for j, i in enumerate(everything[r]) if i is not None]
        boosted = [raw[r][j] + (0.1 if everything[r][j] in is_new else 0.0) for j in valid]
        truth = [everything[r][valid[j]] for j in np.argsort(boosted, kind="stable")[::-1][:10]]
        got = retriever.recommend(user_id=users[r], k=10, new_item_boost=0.1)[0]
        assert len(set(got) & set(truth)) >= 8


@pytest.mark.parametrize("boost", [float("nan"), float("inf"), "0.1", True, None])
def test_new_item_boost_must_be_a_finite_number(retriever: Retriever, boost: object) -> None:
    with pytest.raises(RequestError, match="new_item_boost"):
        retriever.recommend(user_id=retriever.item_ids[0], new_item_boost=boost)  # type: ignore[arg-type]
