"""Ranking metrics of EVALUATION.md from top-K lists (numpy only).

``Recall@K = hits / min(K, |test_u|)``; NDCG@K with binary gains ``1/log2(r+1)`` and an
ideal DCG of ``min(K, |test_u|)`` hits; ``Precision@K = hits / K``; ``HitRate@K`` is the
share of users with a hit; ``Coverage@K`` is distinct recommended items / catalogue.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (10, 20, 50)


def hit_matrix(
    top_items: np.ndarray, target_users: np.ndarray, target_items: np.ndarray, n_items: int
) -> np.ndarray:
    """Boolean (n_users, K): is the item at each rank one of that user's targets
    (a negative row, padding a short list, never is)."""
    n_users = top_items.shape[0]
    ranked_codes = np.arange(n_users, dtype=np.int64)[:, None] * n_items + top_items
    target_codes = target_users.astype(np.int64) * n_items + target_items.astype(np.int64)
    return np.isin(ranked_codes, target_codes) & (top_items >= 0)


def ranking_metrics(
    top_items: np.ndarray,
    target_users: np.ndarray,
    target_items: np.ndarray,
    n_items: int,
    ks: Sequence[int] = DEFAULT_KS,
    prefix: str = "",
) -> dict[str, float]:
    """Metrics averaged over the users that have targets.

    ``top_items`` is (n_users, >= max(ks)) catalogue rows, best first; row ``u`` belongs to
    user position ``u``; targets are (user position, catalogue row) pairs.
    """
    n_users = top_items.shape[0]
    if top_items.shape[1] < max(ks):
        raise ValueError(f"need top-{max(ks)} lists, got {top_items.shape[1]} columns")
    n_targets = np.bincount(target_users, minlength=n_users)
    scored = n_targets > 0
    hits = hit_matrix(top_items, target_users, target_items, n_items)[scored]
    n_targets = n_targets[scored]
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    metrics: dict[str, float] = {}
    for k in ks:
        hits_k = hits[:, :k]
        n_hits = hits_k.sum(axis=1)
        ideal = np.minimum(k, n_targets)
        idcg = np.cumsum(discounts[:k])[ideal - 1]
        metrics[f"{prefix}recall@{k}"] = float(np.mean(n_hits / ideal))
        metrics[f"{prefix}ndcg@{k}"] = float(np.mean((hits_k * discounts[:k]).sum(axis=1) / idcg))
        metrics[f"{prefix}precision@{k}"] = float(np.mean(n_hits / k))
        metrics[f"{prefix}hitrate@{k}"] = float(np.mean(n_hits > 0))
        listed = top_items[scored, :k]
        metrics[f"{prefix}coverage@{k}"] = float(len(np.unique(listed[listed >= 0])) / n_items)
    metrics[f"{prefix}users"] = float(scored.sum())
    return metrics
