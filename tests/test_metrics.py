"""Metrics and top-K with exclusions agree with a brute-force reference."""

from __future__ import annotations

import math

import numpy as np

from towers.data.eval_sets import EvalSet
from towers.evaluation.metrics import ranking_metrics, ranking_sums, user_metrics
from towers.evaluation.ranking import (
    BYTES_PER_CELL,
    SCORE_BUDGET_BYTES,
    chunk_users,
    evaluate_scores,
    scores_by_user,
    top_k_excluding,
)


def reference(top: np.ndarray, targets: list[set[int]], k: int, n_items: int) -> dict[str, float]:
    recalls, ndcgs, precisions, hits_any, recommended = [], [], [], [], set()
    for row, target in enumerate(targets):
        if not target:
            continue
        ranked = list(top[row, :k])
        recommended.update(ranked)
        hits = [item in target for item in ranked]
        ideal = min(k, len(target))
        dcg = sum(1 / math.log2(r + 2) for r, hit in enumerate(hits) if hit)
        idcg = sum(1 / math.log2(r + 2) for r in range(ideal))
        recalls.append(sum(hits) / ideal)
        ndcgs.append(dcg / idcg)
        precisions.append(sum(hits) / k)
        hits_any.append(any(hits))
    return {
        f"recall@{k}": float(np.mean(recalls)),
        f"ndcg@{k}": float(np.mean(ndcgs)),
        f"precision@{k}": float(np.mean(precisions)),
        f"hitrate@{k}": float(np.mean(hits_any)),
        f"coverage@{k}": len(recommended) / n_items,
    }


def test_metrics_match_brute_force_on_random_cases() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_users, n_items = int(rng.integers(1, 30)), int(rng.integers(60, 120))
        top = np.stack([rng.permutation(n_items)[:50] for _ in range(n_users)])
        targets = [
            set(rng.choice(n_items, int(rng.integers(0, 15)), replace=False))
            for _ in range(n_users)
        ]
        if not any(targets):
            targets[0] = {int(top[0, 0])}
        pairs = [(u, i) for u, t in enumerate(targets) for i in t]
        users = np.array([p[0] for p in pairs])
        items = np.array([p[1] for p in pairs])
        got = ranking_metrics(top, users, items, n_items, ks=(10, 20, 50))
        for k in (10, 20, 50):
            for name, value in reference(top, targets, k, n_items).items():
                assert math.isclose(got[name], value, rel_tol=1e-9, abs_tol=1e-12), name
        assert got["users"] == sum(1 for t in targets if t)


def test_top_k_excludes_and_matches_a_full_sort() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(37, 90))
    excluded = [(u, i) for u in range(37) for i in rng.choice(90, 5, replace=False)]
    ex_users = np.array([p[0] for p in excluded])
    ex_items = np.array([p[1] for p in excluded])
    top = top_k_excluding(lambda lo, hi: scores[lo:hi], 37, 20, ex_users, ex_items, chunk_size=8)
    for u in range(37):
        banned = set(ex_items[ex_users == u])
        expected = [i for i in np.argsort(-scores[u], kind="stable") if i not in banned][:20]
        assert list(top[u]) == expected


def test_top_k_never_returns_unavailable_items() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(11, 40))
    unavailable = np.array([3, 17, 25])
    scores[:, unavailable] += 100.0  # the best-scored items, yet no one's candidates
    top = top_k_excluding(
        lambda lo, hi: scores[lo:hi],
        11,
        10,
        np.array([0]),
        np.array([5]),
        chunk_size=4,
        unavailable_items=unavailable,
    )
    for u in range(11):
        banned = set(unavailable) | ({5} if u == 0 else set())
        expected = [i for i in np.argsort(-scores[u], kind="stable") if i not in banned][:10]
        assert list(top[u]) == expected


def test_chunks_shrink_with_the_catalogue_to_bound_memory() -> None:
    # both MovieLens catalogues rank 1024 users at once, as before the bound
    assert chunk_users(1_682) == chunk_users(9_742) == 1024
    for n_items in (100_000, 1_000_000, 10_000_000):
        users = chunk_users(n_items)
        assert 1 <= users < 1024
        assert users * n_items * BYTES_PER_CELL <= SCORE_BUDGET_BYTES
    assert chunk_users(10**12) == 1


def test_evaluation_gives_the_same_lists_whatever_the_chunk() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(50, 30)).astype(np.float32)
    ex_users, ex_items = np.repeat(np.arange(50), 2), rng.integers(0, 30, 100)
    lists = [
        top_k_excluding(lambda lo, hi: scores[lo:hi], 50, 10, ex_users, ex_items, chunk_size=size)
        for size in (1, 7, 1024)
    ]
    assert all(np.array_equal(lists[0], other) for other in lists[1:])


def test_each_users_metrics_average_to_the_metrics_and_match_brute_force() -> None:
    rng = np.random.default_rng(4)
    n_users, n_items = 25, 80
    top = np.stack([rng.permutation(n_items)[:20] for _ in range(n_users)])
    targets = [set(rng.choice(n_items, int(rng.integers(0, 6)), replace=False)) for _ in top]
    targets[0] = {int(top[0, 0])}
    users = np.array([u for u, t in enumerate(targets) for _ in t])
    items = np.array([i for t in targets for i in t])
    scored, values = user_metrics(top, users, items, n_items, ks=(20,))
    assert scored.tolist() == [u for u, t in enumerate(targets) if t]
    means = ranking_metrics(top, users, items, n_items, ks=(20,))
    for name, per_user in values.items():
        assert len(per_user) == len(scored)
        assert float(np.mean(per_user)) == means[name], name  # to the bit
    for position, user in enumerate(scored):
        one = reference(top[user : user + 1], [targets[user]], 20, n_items)
        assert math.isclose(values["ndcg@20"][position], one["ndcg@20"], rel_tol=1e-12)


def test_scores_by_user_names_the_users_and_agrees_with_the_evaluation() -> None:
    rng = np.random.default_rng(5)
    n_users, n_items = 12, 40
    scores = rng.normal(size=(n_users, n_items)).astype(np.float32)
    eval_set = EvalSet(
        user_ids=np.array([f"u{i}" for i in range(n_users)], dtype=object),
        user_inputs={},
        exclude_users=np.repeat(np.arange(n_users), 2),
        exclude_items=rng.integers(0, n_items, 2 * n_users),
        target_users=np.array([0, 0, 3, 7, 11]),
        target_items=np.array([1, 2, 5, 9, 30]),
        popularity=np.zeros(n_items),
    )

    def chunk(lo: int, hi: int) -> np.ndarray:
        return scores[lo:hi]

    user_ids, values = scores_by_user(chunk, n_items, eval_set, (10, 20))
    assert user_ids.tolist() == ["u0", "u3", "u7", "u11"]
    metrics = evaluate_scores(chunk, n_items, eval_set, (10, 20), "")
    for name, per_user in values.items():
        assert float(np.mean(per_user)) == metrics[name], name


def test_metric_sums_are_pinned_to_the_bit() -> None:
    """The sums of a fixed case as the code before per-user metrics gave them, exactly
    (-1 padding, users without targets): runs' metrics must not move by a bit."""
    top = np.array(
        [
            [4, 11, 5, 15, 23, 6, 0, 21, 9, 26, 2, 1],
            [0, 15, 28, 25, 11, 5, 4, 13, 9, 20, 26, 29],
            [15, 23, 8, 24, 6, 26, 21, 9, -1, -1, -1, -1],
            [5, 11, 15, 29, 20, 13, 10, 18, 23, 7, 2, 6],
            [29, 24, 4, 1, 3, 11, 16, 5, 12, 27, 10, 2],
            [19, 15, 14, 11, 13, 0, 5, 8, 29, 16, 12, 22],
            [21, 19, 6, 16, 18, 9, 25, 23, 10, 2, 14, 11],
            [9, 4, 24, 10, 18, 7, 21, 1, 22, 25, 20, 23],
            [4, 10, 0, 13, 29, 28, 25, 15, 17, 1, 24, 19],
        ]
    )
    users = np.array([0, 0, 0, 1, 3, 3, 4, 6, 6, 6, 6, 8])
    items = np.array([4, 23, 24, 23, 13, 19, 19, 11, 20, 22, 2, 8])
    sums = ranking_sums(top, users, items, 30, (5, 10))
    assert sums.users == 6
    assert sums.sums == {
        "recall@5": 0.6666666666666666,
        "ndcg@5": 0.6508205185601091,
        "precision@5": 0.4,
        "hitrate@5": 1.0,
        "recall@10": 1.4166666666666665,
        "ndcg@10": 0.9820730967272087,
        "precision@10": 0.4,
        "hitrate@10": 3.0,
    }
    assert {k: int(listed.sum()) for k, listed in sums.listed.items()} == {5: 20, 10: 27}
