"""Classic recommenders behind one small interface, scored by twotower's own metric code.

Each baseline is fitted on a user x item CSR matrix (rows: users, columns: catalogue
rows) and returns dense scores for a chunk of users; ranking, exclusions and metrics
are the project's (:mod:`towers.evaluation`), so every model is measured the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


class Baseline:
    """fit(train) then scores(users) -> (len(users), n_items)."""

    name = "baseline"

    def fit(self, train: sp.csr_matrix) -> Baseline:
        raise NotImplementedError

    def scores(self, users: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Popularity(Baseline):
    name = "popularity"

    def fit(self, train: sp.csr_matrix) -> Popularity:
        self.counts = np.asarray(train.sum(axis=0)).ravel().astype(np.float32)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts)))


class RandomScores(Baseline):
    """Uniform random scores (seeded): the floor any model must clear."""

    name = "random"

    def fit(self, train: sp.csr_matrix) -> RandomScores:
        self.n_items = train.shape[1]
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(int(users[0]) if len(users) else 0)
        return rng.random((len(users), self.n_items), dtype=np.float32)


class EASE(Baseline):
    """Embarrassingly Shallow Autoencoder (Steck 2019): closed-form item-item weights."""

    name = "ease"

    def __init__(self, l2: float = 200.0) -> None:
        self.l2 = l2

    def fit(self, train: sp.csr_matrix) -> EASE:
        gram = (train.T @ train).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.l2
        precision = np.linalg.inv(gram)
        weights = -precision / np.diag(precision)
        np.fill_diagonal(weights, 0.0)
        self.weights = weights.astype(np.float32)
        self.train = train
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.asarray(self.train[users] @ self.weights)


class EASERecent(EASE):
    """EASE fitted on all of train, scoring from each user's last ``recent`` train items."""

    name = "ease_recent"

    def __init__(self, l2: float = 200.0, recent: sp.csr_matrix | None = None) -> None:
        super().__init__(l2)
        self.recent = recent

    def scores(self, users: np.ndarray) -> np.ndarray:
        assert self.recent is not None, "EASERecent needs the recent-items matrix"
        return np.asarray(self.recent[users] @ self.weights)


class ItemKNN(Baseline):
    """Item-based cosine neighbours (top ``neighbours`` per item)."""

    name = "itemknn"

    def __init__(self, neighbours: int = 100) -> None:
        self.neighbours = neighbours

    def fit(self, train: sp.csr_matrix) -> ItemKNN:
        norms = np.sqrt(np.asarray(train.multiply(train).sum(axis=0)).ravel()) + 1e-9
        sim = (train.T @ train).toarray() / norms[:, None] / norms[None, :]
        np.fill_diagonal(sim, 0.0)
        if self.neighbours < sim.shape[0]:
            cut = np.argpartition(-sim, self.neighbours, axis=0)[self.neighbours :]
            np.put_along_axis(sim, cut, 0.0, axis=0)
        self.sim = sim.astype(np.float32)
        self.train = train
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return np.asarray(self.train[users] @ self.sim)


class ImplicitModel(Baseline):
    """iALS or BPR from the ``implicit`` library; scores are user . item factors."""

    def __init__(self, kind: str, **params: Any) -> None:
        self.kind = kind
        self.name = kind
        self.params = params

    def fit(self, train: sp.csr_matrix) -> ImplicitModel:
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        cls = AlternatingLeastSquares if self.kind == "ials" else BayesianPersonalizedRanking
        self.model = cls(random_state=42, **self.params)
        self.model.fit(train.astype(np.float32), show_progress=False)
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.model.user_factors[users] @ self.model.item_factors.T


class LightFMModel(Baseline):
    """LightFM WARP, pure collaborative or with item features (optional dependency).

    ``item_tokens`` is an item x token count matrix (genres, title words...; every
    catalogue row). Its vocabulary is fitted on the matrix the model is trained on, as
    twotower's encoders are fitted on training data: a token is a feature only if at
    least ``min_token_items`` items with a training interaction carry it, so a word that
    only unseen items have gets no column (it could only be an untrained vector). 0 keeps
    every token of the catalogue. With ``identity`` each item also has its own feature.
    Features are row-normalised (each item's weights sum to 1).

    With ``seen_items_only`` (the cold-item split, attribute-only features) the model is
    fitted on the columns of items that have a training interaction, so WARP never draws
    a held-out cold item as a negative (as twotower's negatives never are); otherwise each
    cold item's attribute tokens would be pushed down through it. Scores still cover the
    whole catalogue, built from every item's features.
    """

    def __init__(
        self,
        item_tokens: sp.csr_matrix | None = None,
        identity: bool = True,
        min_token_items: int = 1,
        seen_items_only: bool = False,
        **params: Any,
    ) -> None:
        if seen_items_only and item_tokens is None:
            raise ValueError("seen_items_only needs item features to represent unseen items")
        self.item_tokens = item_tokens
        self.identity = identity
        self.min_token_items = min_token_items
        self.seen_items_only = seen_items_only
        self.params = params
        self.item_features: sp.csr_matrix | None = None
        self.name = "lightfm_hybrid" if item_tokens is not None else "lightfm"

    def fit(self, train: sp.csr_matrix) -> LightFMModel:
        from lightfm import LightFM

        epochs = self.params.pop("epochs", 30)
        self.model = LightFM(loss="warp", random_state=42, **self.params)
        seen = interacted_items(train)
        if self.item_tokens is not None:
            self.item_features = item_features(
                self.item_tokens, seen, self.min_token_items, self.identity
            )
        features = self.item_features
        if self.seen_items_only and features is not None:
            rows = np.flatnonzero(seen)
            train, features = train[:, rows], features[rows]
        # one thread: LightFM's multi-threaded SGD is lock-free and so differs run to run
        # (two settings tied on validation could swap and halve a cold test number)
        self.model.fit(train.tocoo(), item_features=features, epochs=epochs, num_threads=1)
        self.params["epochs"] = epochs
        return self

    def scores(self, users: np.ndarray) -> np.ndarray:
        biases, factors = self.model.get_item_representations(self.item_features)
        _, user_factors = self.model.get_user_representations()
        return user_factors[users] @ factors.T + biases[None, :]


def item_features(
    item_tokens: sp.csr_matrix, seen: np.ndarray, min_items: int = 1, identity: bool = False
) -> sp.csr_matrix:
    """LightFM item features: [identity +] the tokens of ``item_tokens`` carried by at least
    ``min_items`` of the ``seen`` items (a boolean mask over rows; 0 keeps every token),
    each row normalised to sum 1."""
    tokens = item_tokens.tocsr()
    if min_items > 0:
        carried = np.asarray((tokens[seen] > 0).sum(axis=0)).ravel()
        tokens = tokens[:, np.flatnonzero(carried >= min_items)]
    if identity:
        tokens = sp.hstack([sp.identity(tokens.shape[0], format="csr", dtype=np.float32), tokens])
    matrix = tokens.tocsr().astype(np.float32)
    norms = np.asarray(matrix.sum(axis=1)).ravel()
    return (sp.diags(1.0 / np.maximum(norms, 1.0)) @ matrix).tocsr()


def interacted_items(matrix: sp.csr_matrix) -> np.ndarray:
    """Boolean mask over the columns (items) of a user x item matrix: any interaction."""
    return np.asarray(matrix.sum(axis=0)).ravel() > 0


@dataclass
class Candidate:
    """A baseline with one hyper-parameter setting, for validation search."""

    make: Callable[[], Baseline]
    params: dict[str, Any] = field(default_factory=dict)


def grid(make: Callable[..., Baseline], **values: Sequence[Any]) -> list[Candidate]:
    """Every combination of ``values`` as a :class:`Candidate`."""
    import itertools

    keys = list(values)
    return [
        Candidate(
            lambda combo=combo: make(**dict(zip(keys, combo, strict=True))),
            dict(zip(keys, combo, strict=True)),
        )
        for combo in itertools.product(*(values[k] for k in keys))
    ]
