"""The quality benchmark's baseline adapters on tiny data: same split, same metric code."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from towers.benchmarks.baselines import EASE, EASERecent, ImplicitModel, ItemKNN, Popularity
from towers.benchmarks.quality import build_matrices, metrics_of, run, top_lists
from towers.evaluation.ranking import evaluate_popularity
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
