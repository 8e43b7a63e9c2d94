"""Full-catalogue top-K with per-user exclusions, in chunks of users (numpy only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from towers.data.eval_sets import EvalSet, EvalSource
from towers.evaluation.metrics import DEFAULT_KS, MetricSums, ranking_sums, user_metrics

ScoreFn = Callable[[int, int], np.ndarray]
Scorer = Callable[[EvalSet], ScoreFn]  # the scores of a piece of users, for evaluate_stream

MAX_CHUNK_USERS = 1024
STREAM_USERS = 100_000  # users materialised at once by evaluate_stream
SCORE_BUDGET_BYTES = 512 * 2**20
# bytes per (user, item) cell while a chunk is ranked: the scores as given (float32), their
# float64 copy, its negation for argpartition and argpartition's int64 rows
BYTES_PER_CELL = 4 + 8 + 8 + 8


def chunk_users(n_items: int, budget_bytes: int = SCORE_BUDGET_BYTES) -> int:
    """How many users to rank at once so that a chunk's score arrays stay near
    ``budget_bytes``: at most 1024 (up to 18k items, both MovieLens catalogues), fewer
    for large catalogues (191 users at 100k items), never fewer than one."""
    return max(1, min(MAX_CHUNK_USERS, budget_bytes // max(1, n_items * BYTES_PER_CELL)))


def top_k_excluding(
    score_chunk: ScoreFn,
    n_users: int,
    k: int,
    exclude_users: np.ndarray,
    exclude_items: np.ndarray,
    chunk_size: int = MAX_CHUNK_USERS,
    unavailable_items: np.ndarray | None = None,
) -> np.ndarray:
    """(n_users, k) best catalogue rows per user, excluded pairs never returned (unless a
    user has fewer than ``k`` candidates: then excluded rows fill the end of the list).

    ``score_chunk(lo, hi)`` gives the (hi - lo, n_items) scores of users ``lo..hi-1``;
    ``exclude_users`` must be sorted; ``unavailable_items`` (catalogue rows) are returned
    for no user (while it has other candidates). Ties are broken by catalogue row.
    ``chunk_size``: users ranked at once (:func:`chunk_users` bounds the memory a
    chunk takes for a catalogue's size).
    """
    out = np.full((n_users, k), -1, dtype=np.int64)  # -1 pads lists past the catalogue
    for lo in range(0, n_users, chunk_size):
        hi = min(lo + chunk_size, n_users)
        scores = np.array(score_chunk(lo, hi), dtype=np.float64, copy=True)
        a, b = np.searchsorted(exclude_users, [lo, hi])
        scores[exclude_users[a:b] - lo, exclude_items[a:b]] = -np.inf
        if unavailable_items is not None and len(unavailable_items):
            scores[:, unavailable_items] = -np.inf
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.lexsort((part, -part_scores), axis=1)
        out[lo:hi, :kk] = np.take_along_axis(part, order, axis=1)
    return out


def evaluate_vectors(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    eval_set: EvalSet,
    ks: Sequence[int] = DEFAULT_KS,
    prefix: str = "",
) -> dict[str, float]:
    """Metrics of dot-product scores ``user_vectors @ item_vectors.T`` on ``eval_set``."""
    return evaluate_scores(
        dot_scores(user_vectors, item_vectors), len(item_vectors), eval_set, ks, prefix
    )


def dot_scores(user_vectors: np.ndarray, item_vectors: np.ndarray) -> ScoreFn:
    """Scores of users ``lo..hi-1``: their vectors' dot products with every item's."""

    def chunk(lo: int, hi: int) -> np.ndarray:
        return user_vectors[lo:hi] @ item_vectors.T

    return chunk


def evaluate_popularity(
    eval_set: EvalSet | EvalSource, ks: Sequence[int] = DEFAULT_KS, prefix: str = ""
) -> dict[str, float]:
    """The popularity baseline: every user ranks items by their count in known events
    (an :class:`EvalSource` is streamed, see :func:`evaluate_stream`)."""
    if isinstance(eval_set, EvalSource):
        return evaluate_stream(eval_set, popularity_scorer, eval_set.n_items, ks, prefix)
    n_items = len(eval_set.popularity)
    return evaluate_scores(popularity_scorer(eval_set), n_items, eval_set, ks, prefix)


def evaluate_scores(
    score_chunk: ScoreFn, n_items: int, eval_set: EvalSet, ks: Sequence[int], prefix: str
) -> dict[str, float]:
    """Rank with exclusions and compute the metrics of EVALUATION.md."""
    return score_sums(score_chunk, n_items, eval_set, ks).means(prefix)


def rank_excluding(score_chunk: ScoreFn, n_items: int, eval_set: EvalSet, k: int) -> np.ndarray:
    """The (users, k) top catalogue rows of ``eval_set``'s users, their known items
    excluded, as EVALUATION.md ranks."""
    return top_k_excluding(
        score_chunk,
        eval_set.n_users,
        k,
        eval_set.exclude_users,
        eval_set.exclude_items,
        chunk_size=chunk_users(n_items),
        unavailable_items=eval_set.unavailable_items,
    )


def score_sums(
    score_chunk: ScoreFn, n_items: int, eval_set: EvalSet, ks: Sequence[int]
) -> MetricSums:
    """Rank with exclusions; the per-user metric sums of EVALUATION.md."""
    top = rank_excluding(score_chunk, n_items, eval_set, max(ks))
    return ranking_sums(top, eval_set.target_users, eval_set.target_items, n_items, ks)


def scores_by_user(
    score_chunk: ScoreFn, n_items: int, eval_set: EvalSet, ks: Sequence[int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rank with exclusions; the ids of the users with targets and each one's metrics of
    EVALUATION.md (``recall@K``, ``ndcg@K``, ...), for paired comparisons of two models
    on the same users. Their means are the metrics of :func:`evaluate_scores`."""
    top = rank_excluding(score_chunk, n_items, eval_set, max(ks))
    scored, values = user_metrics(top, eval_set.target_users, eval_set.target_items, n_items, ks)
    return eval_set.user_ids[scored], values


def evaluate_stream(
    source: EvalSource,
    scorer: Scorer,
    n_items: int,
    ks: Sequence[int] = DEFAULT_KS,
    prefix: str = "",
    users_per_piece: int = STREAM_USERS,
    max_users: int | None = None,
) -> dict[str, float]:
    """The metrics of EVALUATION.md over the users of ``source``, ``users_per_piece`` at
    a time: each piece is materialised, scored (``scorer(piece)`` gives its scores by
    user range), ranked and summed, then dropped, so memory does not grow with the
    number of users. ``max_users``: only the first so many users. With every user in one
    piece (up to 100k users by default: both MovieLens sets) the metrics are those of
    :func:`evaluate_scores` on the whole set, to the bit; over several pieces they differ
    only by floating-point summation order."""
    if users_per_piece <= 0:
        raise ValueError(f"users_per_piece must be positive, got {users_per_piece}")
    n_users = source.n_users if max_users is None else min(max_users, source.n_users)
    total = MetricSums(tuple(ks), n_items)
    pieces = range(0, n_users, users_per_piece)
    for lo in tqdm(pieces, desc="evaluating", unit="piece", disable=len(pieces) < 4, leave=False):
        piece = source.materialise(lo, min(lo + users_per_piece, n_users))
        total.add(score_sums(scorer(piece), n_items, piece, ks))
    return total.means(prefix)


def vector_scorer(
    embed_users: Callable[[dict[str, np.ndarray]], np.ndarray], item_vectors: np.ndarray
) -> Scorer:
    """A scorer for :func:`evaluate_stream`: dot products of the piece's users, embedded
    by ``embed_users`` (all of a piece at once), with ``item_vectors``."""

    def scorer(piece: EvalSet) -> ScoreFn:
        return dot_scores(embed_users(piece.user_inputs), item_vectors)

    return scorer


def popularity_scorer(piece: EvalSet) -> ScoreFn:
    """A scorer for :func:`evaluate_stream`: the popularity baseline."""
    popularity = piece.popularity

    def chunk(lo: int, hi: int) -> np.ndarray:
        return np.broadcast_to(popularity, (hi - lo, len(popularity)))

    return chunk
