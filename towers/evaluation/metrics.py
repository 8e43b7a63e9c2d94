"""Ranking metrics of EVALUATION.md from top-K lists (numpy only).

``Recall@K = hits / min(K, |test_u|)``; NDCG@K with binary gains ``1/log2(r+1)`` and an
ideal DCG of ``min(K, |test_u|)`` hits; ``Precision@K = hits / K``; ``HitRate@K`` is the
share of users with a hit; ``Coverage@K`` is distinct recommended items / catalogue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

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


@dataclass
class MetricSums:
    """Per-user metric sums over some users, to be combined with other users' sums:
    :func:`ranking_sums` of each piece, :meth:`add` them, :meth:`means` at the end."""

    ks: tuple[int, ...]
    n_items: int
    sums: dict[str, float] = field(default_factory=dict)
    users: int = 0
    listed: dict[int, np.ndarray] = field(default_factory=dict)

    def add(self, other: MetricSums) -> None:
        """Add the sums of other users (of the same ``ks`` and catalogue)."""
        for name, value in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.users += other.users
        for k, listed in other.listed.items():
            self.listed[k] = listed if k not in self.listed else self.listed[k] | listed

    def means(self, prefix: str = "") -> dict[str, float]:
        """The metrics of EVALUATION.md over every user added."""
        metrics: dict[str, float] = {}
        for k in self.ks:
            for name in ("recall", "ndcg", "precision", "hitrate"):
                total = self.sums.get(f"{name}@{k}", 0.0)
                metrics[f"{prefix}{name}@{k}"] = total / self.users if self.users else math.nan
            listed = self.listed.get(k)
            covered = 0 if listed is None else int(listed.sum())
            metrics[f"{prefix}coverage@{k}"] = float(covered / self.n_items)
        metrics[f"{prefix}users"] = float(self.users)
        return metrics


def user_metrics(
    top_items: np.ndarray,
    target_users: np.ndarray,
    target_items: np.ndarray,
    n_items: int,
    ks: Sequence[int] = DEFAULT_KS,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each user's metrics: the positions of the users that have targets (in order), and
    their ``recall@K``, ``ndcg@K``, ``precision@K`` and ``hitrate@K``, one value per user
    (what :func:`ranking_sums` sums; see :func:`ranking_metrics` for the arguments)."""
    n_users = top_items.shape[0]
    if top_items.shape[1] < max(ks):
        raise ValueError(f"need top-{max(ks)} lists, got {top_items.shape[1]} columns")
    n_targets = np.bincount(target_users, minlength=n_users)
    scored = np.flatnonzero(n_targets > 0)
    hits = hit_matrix(top_items, target_users, target_items, n_items)[scored]
    n_targets = n_targets[scored]
    discounts = 1.0 / np.log2(np.arange(2, max(ks) + 2))
    values: dict[str, np.ndarray] = {}
    for k in ks:
        hits_k = hits[:, :k]
        n_hits = hits_k.sum(axis=1)
        ideal = np.minimum(k, n_targets)
        idcg = np.cumsum(discounts[:k])[ideal - 1]
        values[f"recall@{k}"] = n_hits / ideal
        values[f"ndcg@{k}"] = (hits_k * discounts[:k]).sum(axis=1) / idcg
        values[f"precision@{k}"] = n_hits / k
        values[f"hitrate@{k}"] = n_hits > 0
    return scored, values


def ranking_sums(
    top_items: np.ndarray,
    target_users: np.ndarray,
    target_items: np.ndarray,
    n_items: int,
    ks: Sequence[int] = DEFAULT_KS,
) -> MetricSums:
    """Per-user metric sums over the users that have targets (see :func:`ranking_metrics`)."""
    scored, values = user_metrics(top_items, target_users, target_items, n_items, ks)
    # np.sum(x) / n is np.mean(x) to the bit: one piece gives the plain means
    out = MetricSums(tuple(ks), n_items, users=len(scored))
    out.sums = {name: float(np.sum(per_user)) for name, per_user in values.items()}
    for k in ks:
        listed = top_items[scored, :k]
        mask = np.zeros(n_items, dtype=bool)
        mask[listed[listed >= 0]] = True
        out.listed[k] = mask
    return out


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
    return ranking_sums(top_items, target_users, target_items, n_items, ks).means(prefix)
