"""The quality benchmark's baseline adapters on tiny data: same split, same metric code."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from benchmarks.baselines import EASE, EASERecent, ImplicitModel, ItemKNN, Popularity
from benchmarks.quality import (
    among_cold,
    build_matrices,
    cold_rows,
    cold_share,
    exposure_matched_row,
    exposure_matching_boost,
    metrics_of,
    run,
    top_lists,
)
from towers.evaluation.ranking import evaluate_popularity, top_k_excluding
from towers.pipeline import prepare

from .conftest import TINY_OVERRIDES, compose_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    cfg = compose_config([*TINY_OVERRIDES, f"paths.output_dir={tmp_path_factory.mktemp('bench')}"])
    data = prepare(cfg)
    return cfg, data, build_matrices(data)


def test_popularity_adapter_matches_the_pipelines_popularity(tiny) -> None:
    _, data, matrices = tiny
    model = Popularity().fit(matrices.train)
    top = top_lists(model.scores, matrices.rows(data.test.user_ids), data.test, data.n_items)
    ours = metrics_of(top, data.test, data.n_items)
    reference = evaluate_popularity(data.test, (10, 20, 50))
    for key in ("recall@20", "ndcg@20", "coverage@50"):
        assert ours[key] == pytest.approx(reference[key], abs=1e-12)


def test_ease_is_the_closed_form() -> None:
    x = sp.csr_matrix(
        np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 1]], dtype=np.float32)
    )
    model = EASE(l2=0.5).fit(x)
    gram = x.T.toarray() @ x.toarray() + 0.5 * np.eye(4)
    p = np.linalg.inv(gram)
    expected = np.eye(4) - p / np.diag(p)
    np.testing.assert_allclose(model.weights, expected, atol=1e-5)
    assert np.all(np.diag(model.weights) == 0)


def test_ease_recent_scores_from_recent_items_only() -> None:
    x = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], dtype=np.float32))
    recent = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32))
    model = EASERecent(l2=1.0, recent=recent).fit(x)
    np.testing.assert_allclose(
        model.scores(np.array([0, 1, 2])), recent.toarray() @ model.weights, atol=1e-6
    )


def test_itemknn_keeps_the_nearest_neighbours() -> None:
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((30, 12)) < 0.3).astype(np.float32))
    model = ItemKNN(neighbours=3).fit(x)
    assert ((model.sim > 0).sum(axis=0) <= 3).all()


@pytest.mark.parametrize("kind", ["ials", "bpr"])
def test_implicit_models_score_every_item(tiny, kind: str) -> None:
    _, data, matrices = tiny
    model = ImplicitModel(kind, factors=8, iterations=3).fit(matrices.train)
    scores = model.scores(np.arange(5))
    assert scores.shape == (5, data.n_items) and np.isfinite(scores).all()


def test_benchmark_run_scores_every_model_with_one_metric_code(tiny) -> None:
    cfg, data, _ = tiny
    rows, stats = run(cfg, ["popularity", "ease", "ease_recent", "itemknn"])
    assert [r["model"] for r in rows] == ["popularity", "ease", "ease_recent", "itemknn"]
    for row in rows:
        assert 0 <= row["recall@20"] <= 1 and 0 <= row["ndcg@20"] <= 1
        assert len(row["curve"]) == 50 * 5 + 1
    assert stats["test_users_scored"] == data.test.n_users
    by_model = {r["model"]: r for r in rows}
    assert by_model["ease"]["recall@50"] > by_model["popularity"]["recall@50"]


@pytest.fixture(scope="module")
def tiny_cold(tmp_path_factory: pytest.TempPathFactory):
    cfg = compose_config(
        [
            *TINY_OVERRIDES,
            "split.cold_items=true",
            f"paths.output_dir={tmp_path_factory.mktemp('cold')}",
        ]
    )
    data = prepare(cfg)
    return cfg, data, build_matrices(data)


def test_cold_share_counts_cold_items_in_the_top_lists(tiny_cold) -> None:
    _, data, _ = tiny_cold
    cold = np.flatnonzero(data.catalogue["item_id"].isin(set(data.split.cold_items)))
    warm = np.setdiff1d(np.arange(data.n_items), cold)
    n = data.test.n_users
    all_cold = np.tile(np.resize(cold, 20), (n, 1))
    half = np.tile(np.r_[np.resize(cold, 5), np.resize(warm, 5), -np.ones(10, int)], (n, 1))
    assert cold_share(all_cold, data)["cold_share@20"] == 1.0
    assert cold_share(half, data)["cold_share@20"] == 0.5
    assert cold_share(half, data)["cold_share_catalogue"] == pytest.approx(len(cold) / data.n_items)


def test_among_cold_ranks_the_held_out_items_only(tiny_cold) -> None:
    cfg, data, matrices = tiny_cold
    cold = cold_rows(data)
    assert len(cold) == len(data.split.cold_items)
    rows = matrices.rows(data.test.user_ids)
    model = Popularity().fit(matrices.train)  # cold items have no count: last in full ranking
    full = top_lists(model.scores, rows, data.test, data.n_items, k=5)
    only = top_lists(model.scores, rows, among_cold(data), data.n_items, k=5)
    assert not set(full.ravel()) & set(cold)
    assert set(only.ravel()) <= set(cold)
    assert metrics_of(only, data.test, data.n_items, (5,))["recall@5"] > 0
    by_model = {r["model"]: r for r in run(cfg, ["popularity", "random"])[0]}
    assert by_model["popularity"]["recall@20"] == 0.0
    assert by_model["popularity"]["cold_only_recall@20"] > 0.0
    for row in by_model.values():
        assert row["cold_only_recall@20"] >= row["recall@20"]


def test_exposure_matching_boost_is_the_smallest_that_reaches_the_target() -> None:
    assert exposure_matching_boost(lambda b: 0.5, 0.4) == -2.0
    boost = exposure_matching_boost(lambda b: float(b >= 0.7), 1.0)
    assert 0.7 <= boost < 0.7 + 1e-5
    assert -0.3 <= exposure_matching_boost(lambda b: float(b >= -0.3), 0.5) < -0.3 + 1e-5


def test_exposure_matched_row_gives_twotower_the_reference_share(tiny_cold) -> None:
    _, data, _ = tiny_cold
    test = data.test
    scores = np.random.default_rng(1).uniform(-1, 1, (test.n_users, data.n_items))
    new = test.popularity == 0
    scores[:, new] = scores[:, new] / 2 - 0.5  # new items start low, as seen ones win

    def rank(boost: float) -> np.ndarray:
        return top_k_excluding(
            lambda lo, hi: scores[lo:hi] + boost * new,
            test.n_users,
            50,
            test.exclude_users,
            test.exclude_items,
        )

    before = cold_share(rank(0.0), data)["cold_share@20"]
    most = cold_share(rank(2.0), data)["cold_share@20"]
    twotower = {"model": "twotower", "fit_s": 1.0, "cold_only_recall@20": 0.5}
    reference = {"model": "other", "cold_share@20": (before + most) / 2}
    row = exposure_matched_row(twotower, rank, reference, data)
    assert row["model"] == "twotower_exposure_matched"
    assert row["cold_share@20"] >= reference["cold_share@20"] > before
    assert row["cold_only_recall@20"] == 0.5
    boost = row["params"]["new_item_boost"]
    assert cold_share(rank(boost - 1e-4), data)["cold_share@20"] < reference["cold_share@20"]
    assert row["recall@20"] == metrics_of(rank(boost), test, data.n_items)["recall@20"]
    # a model above the reference's share gets a negative boost
    high = cold_share(rank(1.2), data)["cold_share@20"]
    lower = exposure_matched_row(
        twotower, lambda b: rank(b + 1.2), {"model": "o", "cold_share@20": high / 2}, data
    )
    assert lower["params"]["new_item_boost"] < 0
    assert high / 2 <= lower["cold_share@20"] < high


def tokens_with_a_cold_only_token(data) -> tuple[np.ndarray, sp.csr_matrix]:
    """The catalogue's item tokens plus one last token that only the held-out items carry;
    also the held-out items' mask."""
    from benchmarks.quality import item_token_matrix

    is_cold = data.catalogue["item_id"].isin(set(data.split.cold_items)).to_numpy()
    flag = sp.csr_matrix(is_cold.astype(np.float32)[:, None])
    return is_cold, sp.hstack([item_token_matrix(data), flag]).tocsr()


def test_lightfm_hybrid_never_draws_cold_items_as_negatives(tiny_cold) -> None:
    pytest.importorskip("lightfm", reason="lightfm is an optional benchmark extra")
    from benchmarks.baselines import LightFMModel

    _, data, matrices = tiny_cold
    # the extra token held by cold items only, kept in the vocabulary (min_token_items=0):
    # it is trained only if they are drawn as negatives
    _, tokens = tokens_with_a_cold_only_token(data)
    settings = {"identity": False, "min_token_items": 0, "no_components": 8, "epochs": 2}
    seen_only = LightFMModel(tokens, seen_items_only=True, **settings)
    every_item = LightFMModel(tokens, **settings)
    for model in (seen_only, every_item):
        model.fit(matrices.train)
    assert seen_only.model.item_biases[-1] == 0.0  # LightFM starts biases at 0
    assert every_item.model.item_biases[-1] < 0.0  # pushed down as a negative only
    scores = seen_only.scores(np.arange(3))
    assert scores.shape == (3, data.n_items) and np.isfinite(scores).all()
    with pytest.raises(ValueError, match="item features"):
        LightFMModel(None, seen_items_only=True)


def test_lightfm_hybrid_vocabulary_is_fitted_on_its_training_items(tiny_cold) -> None:
    pytest.importorskip("lightfm", reason="lightfm is an optional benchmark extra")
    from benchmarks.baselines import LightFMModel, interacted_items

    _, data, matrices = tiny_cold
    is_cold, tokens = tokens_with_a_cold_only_token(data)
    model = LightFMModel(tokens, identity=False, seen_items_only=True, no_components=8, epochs=1)
    model.fit(matrices.train)
    assert model.item_features is not None
    # the cold-only token has no column: no training item carries it
    seen = interacted_items(matrices.train)
    assert not (seen & is_cold).any()
    carried = np.asarray((tokens[seen] > 0).sum(axis=0)).ravel()
    assert model.item_features.shape == (data.n_items, int((carried > 0).sum()))
    assert carried[-1] == 0
    np.testing.assert_allclose(model.item_features[seen].sum(axis=1), 1.0, rtol=1e-6)


def test_item_features_keep_tokens_of_enough_seen_items(tiny_cold) -> None:
    from benchmarks.baselines import interacted_items, item_features
    from benchmarks.quality import item_token_matrix

    _, data, matrices = tiny_cold
    tokens = item_token_matrix(data)
    seen = interacted_items(matrices.fit)
    carried = np.asarray((tokens[seen] > 0).sum(axis=0)).ravel()
    threshold = int(np.median(carried[carried > 0])) + 1
    kept = item_features(tokens, seen, min_items=threshold)
    assert kept.shape[1] == int((carried >= threshold).sum()) < tokens.shape[1]
    assert item_features(tokens, seen, min_items=0).shape[1] == tokens.shape[1]
    with_ids = item_features(tokens, seen, min_items=threshold, identity=True)
    assert with_ids.shape == (data.n_items, data.n_items + kept.shape[1])
    np.testing.assert_allclose(np.asarray(with_ids.sum(axis=1)).ravel(), 1.0, rtol=1e-6)


def test_lightfm_fits_are_deterministic(tiny) -> None:
    pytest.importorskip("lightfm", reason="lightfm is an optional benchmark extra")
    from benchmarks.baselines import LightFMModel

    _, _, matrices = tiny
    first, second = (
        LightFMModel(None, no_components=8, epochs=3).fit(matrices.train) for _ in range(2)
    )
    np.testing.assert_array_equal(first.scores(np.arange(4)), second.scores(np.arange(4)))
