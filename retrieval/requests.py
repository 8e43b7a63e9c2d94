"""Checking a retrieval call's arguments, and the shape of its answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.users import UserFeatures
from twotower.errors import RequestError

MAX_K = 10_000
MODEL, HISTORY, POPULARITY = "model", "history", "popularity"
SERVED_BY = (MODEL, HISTORY, POPULARITY)


@dataclass(frozen=True)
class Recommendations:
    """What :meth:`Retriever.retrieve` returns: ``ids`` (object, (n, k), ``None``-padded),
    ``scores`` (float32, NaN-padded) and, per user, what served it: ``"model"`` (the user
    tower on a known user or given attributes), ``"history"`` (the user tower on recent
    items alone: an unknown user) or ``"popularity"`` (nothing known: the most popular
    items, scored by training counts, not cosines)."""

    ids: np.ndarray
    scores: np.ndarray
    served_by: list[str]


def check_k(k: Any) -> int:
    """``k`` as an int in 1..MAX_K, or a :class:`RequestError`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 < k <= MAX_K:
        raise RequestError(f"k must be a positive integer of at most {MAX_K}, got {k!r}")
    return int(k)


def check_boost(boost: Any) -> float:
    """``new_item_boost`` as a finite float in [-1e6, 1e6], or a :class:`RequestError`."""
    if isinstance(boost, bool) or not isinstance(boost, (int, float, np.number)):
        raise RequestError(f"new_item_boost must be a number, got {boost!r}")
    if not np.isfinite(boost) or abs(boost) > 1e6:
        raise RequestError(f"new_item_boost must be finite and within ±1e6, got {boost!r}")
    return float(boost)


def batch_args(
    user_ids: Sequence[Any] | None,
    histories: Sequence[Sequence[Any] | None] | None,
    user_features: Sequence[UserFeatures | None] | None,
) -> tuple[list[Any], list[Any], list[Any]]:
    """The three per-user arguments as equally long lists (``None`` where not given)."""
    given = {
        n: v
        for n, v in (
            ("user_ids", user_ids),
            ("histories", histories),
            ("user_features", user_features),
        )
        if v is not None
    }
    if not given:
        raise RequestError("give user_ids, histories and/or user_features (one entry per user)")
    for name, value in given.items():
        if isinstance(value, (str, bytes)):
            raise RequestError(f"{name} must be a sequence with one entry per user, not a string")
    lengths = {n: len(v) for n, v in given.items()}
    if len(set(lengths.values())) != 1:
        raise RequestError(f"one entry per user in each argument, got lengths {lengths}")
    n = next(iter(lengths.values()))
    return (
        list(user_ids) if user_ids is not None else [None] * n,
        list(histories) if histories is not None else [None] * n,
        list(user_features) if user_features is not None else [None] * n,
    )
