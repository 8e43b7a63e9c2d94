"""Tiny synthetic run: train -> evaluate -> bundle -> Retriever, and the numbers agree."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from retrieval import Retriever
from towers.pipeline import METRICS_FILE, TrainResult

from .conftest import served_test_metrics


def test_model_beats_popularity_on_validation(trained: TrainResult) -> None:
    metrics = trained.metrics
    assert metrics["val/recall@20"] > 1.3 * metrics["val_popularity/recall@20"]
    assert metrics["test/recall@20"] > metrics["test_popularity/recall@20"]


def test_run_writes_metrics_json_with_model_and_popularity(trained: TrainResult) -> None:
    saved = json.loads((trained.output_dir / METRICS_FILE).read_text())
    for key in ("val/recall@20", "test/ndcg@20", "test_popularity/recall@20", "test/coverage@50"):
        assert key in saved
    assert saved["split"]["test_users"] > 0
    assert any((trained.output_dir / "tensorboard").rglob("events.out.tfevents*"))


def test_retriever_returns_k_distinct_unseen_items(trained: TrainResult) -> None:
    retriever = Retriever.load(trained.bundle)
    train = trained.data.split.train
    for user in trained.data.test.user_ids[:20]:
        ids, scores = retriever.recommend(user_id=user, k=10)
        assert len(ids) == 10 and len(set(ids)) == 10
        seen = set(train.loc[train["user_id"] == user, "item_id"])
        assert not seen & set(ids)
        assert np.all(np.diff(scores) <= 1e-6)
        assert set(ids) <= set(retriever.item_ids)


def test_retriever_reproduces_the_pipeline_test_metrics(trained: TrainResult) -> None:
    served = served_test_metrics(trained)
    for key in ("recall@20", "ndcg@20", "recall@50"):
        assert abs(served[key] - trained.metrics[f"test/{key}"]) < 1e-3, key


def test_history_items_are_excluded_and_move_the_user(trained: TrainResult) -> None:
    retriever = Retriever.load(trained.bundle)
    history = list(retriever.item_ids[:5])
    ids, _ = retriever.recommend(history=history, k=10)
    assert len(ids) == 10 and not set(history) & set(ids)
    other, _ = retriever.recommend(history=list(retriever.item_ids[50:55]), k=10)
    assert list(ids) != list(other)


def test_unknown_user_without_history_gets_popular_items(trained: TrainResult) -> None:
    retriever = Retriever.load(trained.bundle)
    ids, scores = retriever.recommend(user_id="nobody-knows-me", k=5)
    counts = trained.data.split.train["item_id"].value_counts()
    catalogue = list(retriever.item_ids)
    expected = sorted(counts.index, key=lambda item: (-counts[item], catalogue.index(item)))[:5]
    assert list(ids) == expected
    np.testing.assert_array_equal(scores, counts[expected].to_numpy(dtype=np.float32))
    assert len(set(ids)) == 5


def test_k_larger_than_catalogue_returns_what_is_left(trained: TrainResult) -> None:
    retriever = Retriever.load(trained.bundle)
    user = trained.data.test.user_ids[0]
    ids, _ = retriever.recommend(user_id=user, k=10_000)
    seen = set(trained.data.split.train.query("user_id == @user")["item_id"])
    assert len(ids) == len(retriever.item_ids) - len(seen)


def test_importing_retrieval_does_not_import_torch(trained: TrainResult) -> None:
    code = "\n".join(
        [
            "import sys, retrieval",
            "r = retrieval.Retriever.load(sys.argv[1])",
            "r.recommend(history=[], k=3)",
            "r.recommend(user_id='nobody', k=3)",
            "heavy = ('torch', 'pytorch_lightning', 'lightning')",
            "bad = [m for m in sys.modules if m.split('.')[0] in heavy]",
            "assert not bad, bad",
        ]
    )
    subprocess.run([sys.executable, "-c", code, str(trained.bundle)], check=True)
