"""Quality benchmark: twotower next to classic recommenders on one EVALUATION.md split.

The split is built once (by the same code the training pipeline uses); every baseline
picks its hyper-parameters on validation (fitted on train minus validation), is refitted
on all of train with the chosen setting, and is scored once on test. twotower is trained
with its default config for the dataset and scored through the served bundle
(:class:`retrieval.Retriever`), so its numbers are those a served model gives.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from omegaconf import DictConfig

from benchmarks.baselines import (
    EASE,
    Candidate,
    EASERecent,
    ImplicitModel,
    ItemKNN,
    LightFMModel,
    Popularity,
    RandomScores,
    grid,
)
from retrieval import Retriever
from towers.data.eval_sets import EvalSet, catalogue_rows
from towers.data.ids import distinct_in_order, positions_in
from towers.data.prepare import PreparedData
from towers.data.schema import ITEM_ID, USER_ID
from towers.evaluation.metrics import ranking_metrics
from towers.evaluation.ranking import top_k_excluding
from towers.pipeline import prepare, split_settings, train

log = logging.getLogger(__name__)
KS = (10, 20, 50)
CURVE_KS = tuple(range(1, 51))
SELECT_ON = "ndcg@20"
RECENT_ITEMS = 20
# LightFM hybrid: keep attribute tokens carried by at least this many of the items it is
# trained on (searched on validation; 1 keeps every token of a training item, 20 frequent
# words only, as twotower's features.text_min_count may)
TOKEN_MIN_ITEMS = (1, 20)
# cold split: twotower is also scored with its new items lifted to this model's share of
# the top-20s (an equal-exposure comparison, next to the protocol's own ranking)
EXPOSURE_REFERENCE = "lightfm_hybrid"


@dataclass
class Matrices:
    """User x item matrices of one split; rows are users in ``user_index`` order."""

    user_index: pd.Index
    fit: sp.csr_matrix
    train: sp.csr_matrix
    recent_fit: sp.csr_matrix
    recent_train: sp.csr_matrix

    def rows(self, user_ids: np.ndarray) -> np.ndarray:
        return self.user_index.get_indexer(user_ids)


def interaction_matrix(
    events: pd.DataFrame, users: pd.Index, catalogue: pd.DataFrame, last: int | None = None
) -> sp.csr_matrix:
    """Binary user x item matrix; with ``last``, only each user's last ``last`` events
    (``events`` sorted by user, then time)."""
    if last is not None:
        events = events.groupby(USER_ID, sort=False).tail(last)
    rows = positions_in(users, events[USER_ID])
    cols = catalogue_rows(catalogue, events[ITEM_ID])
    data = np.ones(len(rows), dtype=np.float32)
    return sp.csr_matrix((data, (rows, cols)), shape=(len(users), len(catalogue)))


def build_matrices(data: PreparedData) -> Matrices:
    split = data.split
    users = pd.Index(
        distinct_in_order(pd.concat([split.train[USER_ID], split.test[USER_ID]])), dtype=object
    )
    return Matrices(
        users,
        interaction_matrix(split.fit, users, data.catalogue),
        interaction_matrix(split.train, users, data.catalogue),
        interaction_matrix(split.fit, users, data.catalogue, RECENT_ITEMS),
        interaction_matrix(split.train, users, data.catalogue, RECENT_ITEMS),
    )


def top_lists(
    score_rows: Callable[[np.ndarray], np.ndarray],
    rows: np.ndarray,
    eval_set: EvalSet,
    n_items: int,
    k: int = 50,
) -> np.ndarray:
    """(n_users, k) catalogue rows, the user's known items excluded."""
    return top_k_excluding(
        lambda lo, hi: score_rows(rows[lo:hi]),
        eval_set.n_users,
        k,
        eval_set.exclude_users,
        eval_set.exclude_items,
        unavailable_items=eval_set.unavailable_items,
    )


def metrics_of(
    top: np.ndarray, eval_set: EvalSet, n_items: int, ks: Sequence[int] = KS
) -> dict[str, float]:
    return ranking_metrics(top, eval_set.target_users, eval_set.target_items, n_items, ks)


def cold_share(top: np.ndarray, data: PreparedData, k: int = 20) -> dict[str, float]:
    """In the cold-item split: the share of each top-``k`` list that is held-out (cold)
    items, averaged over users, next to that share in the catalogue. Every test target is
    cold, so a model that ranks cold items high *because* they are unseen (never a
    negative) gains recall without knowing which cold item a user wants; this column
    makes that visible. Empty outside the cold split."""
    if not len(data.split.cold_items):
        return {}
    cold = np.zeros(data.n_items, dtype=bool)
    cold[cold_rows(data)] = True
    listed = top[:, :k]
    in_list = listed >= 0
    share = (cold[np.where(in_list, listed, 0)] & in_list).sum(axis=1) / np.maximum(
        in_list.sum(axis=1), 1
    )
    return {f"cold_share@{k}": float(share.mean()), "cold_share_catalogue": float(cold.mean())}


def cold_rows(data: PreparedData) -> np.ndarray:
    """Catalogue rows of the cold split's held-out (test) items; empty outside it."""
    return np.flatnonzero(data.catalogue[ITEM_ID].isin(set(data.split.cold_items)).to_numpy())


def among_cold(data: PreparedData) -> EvalSet:
    """The test set ranked among the held-out items only: every other item is no one's
    candidate. The cold split's protocol ranks the whole catalogue, so a model gains there
    by ranking unseen items high as such (``cold_share``); ranked among the held-out items
    alone, as a "new arrivals" slot would be, the score says only how well a model tells
    which new item a user wants."""
    warm = np.setdiff1d(np.arange(data.n_items), cold_rows(data))
    return dataclasses.replace(data.test, unavailable_items=warm)


def among_cold_metrics(
    rank_among_cold: Callable[[], np.ndarray], data: PreparedData
) -> dict[str, float]:
    """``cold_only_recall@20`` / ``cold_only_ndcg@20`` of the top lists ``rank_among_cold()``
    returns, ranked among the cold split's held-out items (:func:`among_cold`); empty (and
    nothing ranked) outside the cold split."""
    if not len(data.split.cold_items):
        return {}
    metrics = metrics_of(rank_among_cold(), data.test, data.n_items, (20,))
    return {f"cold_only_{name}@20": metrics[f"{name}@20"] for name in ("recall", "ndcg")}


def candidates(
    data: PreparedData, with_lightfm: bool, cold: bool = False
) -> dict[str, list[Candidate]]:
    """Hyper-parameter grids per baseline (searched on validation only)."""
    l2 = (50.0, 100.0, 200.0, 500.0, 1000.0)
    models: dict[str, list[Candidate]] = {
        "popularity": [Candidate(Popularity)],
        "random": [Candidate(RandomScores)],
        "ease": grid(EASE, l2=l2),
        "ease_recent": grid(lambda l2: EASERecent(l2), l2=l2),
        "itemknn": grid(ItemKNN, neighbours=(50, 100, 200)),
        "ials": grid(
            lambda **p: ImplicitModel("ials", **p),
            factors=(64, 128),
            regularization=(1.0, 10.0),
            alpha=(1.0,),
            iterations=(15,),
        ),
        "bpr": grid(
            lambda **p: ImplicitModel("bpr", **p),
            factors=(64, 128),
            learning_rate=(0.01, 0.05),
            regularization=(0.01,),
            iterations=(100,),
        ),
    }
    if with_lightfm:
        # Held-out cold items' identity features are never trained: in the cold split the
        # hybrid represents items by their attributes only, and draws negatives only from
        # items seen in training (as twotower does). Its token vocabulary is fitted on the
        # items it is trained on; tokens in fewer than min_token_items of them (rare title
        # words) can be dropped too, as twotower may drop them: chosen on validation.
        tokens = item_token_matrix(data)
        models["lightfm"] = grid(
            lambda **p: LightFMModel(None, **p),
            no_components=(64,),
            learning_rate=(0.05,),
            epochs=(20, 40),
        )
        models["lightfm_hybrid"] = grid(
            lambda **p: LightFMModel(tokens, identity=not cold, seen_items_only=cold, **p),
            min_token_items=TOKEN_MIN_ITEMS,
            no_components=(64,),
            learning_rate=(0.05,),
            epochs=(20, 40),
        )
    return models


def item_token_matrix(data: PreparedData) -> sp.csr_matrix:
    """Item x token counts of every item's categorical / multi-hot / text tokens (catalogue
    rows; the LightFM hybrid's raw features, see ``LightFMModel``)."""
    blocks = []
    for name, values in data.catalogue_inputs.items():
        if name in ("item_cat", "item_bag"):
            rows = np.repeat(np.arange(data.n_items), values.shape[1])
            tokens = values.ravel()
            keep = tokens > 1
            width = int(tokens.max()) + 1
            blocks.append(
                sp.csr_matrix(
                    (np.ones(keep.sum(), np.float32), (rows[keep], tokens[keep])),
                    shape=(data.n_items, width),
                )
            )
    return sp.hstack(blocks).tocsr() if blocks else sp.csr_matrix((data.n_items, 0))


def run_baseline(
    name: str, grid_: list[Candidate], data: PreparedData, matrices: Matrices
) -> dict[str, Any]:
    """Pick on validation (fit split), refit on train, score test once."""
    val_rows, test_rows = matrices.rows(data.validation.user_ids), matrices.rows(data.test.user_ids)
    best: tuple[float, Candidate] | None = None
    for candidate in grid_:
        model = candidate.make()
        if isinstance(model, EASERecent):
            model.recent = matrices.recent_fit
        model.fit(matrices.fit)
        val = metrics_of(
            top_lists(model.scores, val_rows, data.validation, data.n_items),
            data.validation,
            data.n_items,
        )
        log.info("%s %s: val %s %.4f", name, candidate.params, SELECT_ON, val[SELECT_ON])
        if best is None or val[SELECT_ON] > best[0]:
            best = (val[SELECT_ON], candidate)
    assert best is not None
    model = best[1].make()
    if isinstance(model, EASERecent):
        model.recent = matrices.recent_train
    start = time.perf_counter()
    model.fit(matrices.train)
    fit_seconds = time.perf_counter() - start
    top = top_lists(model.scores, test_rows, data.test, data.n_items)
    cold_only = among_cold_metrics(
        lambda: top_lists(model.scores, test_rows, among_cold(data), data.n_items), data
    )
    return {
        "model": name,
        "params": best[1].params,
        "val_" + SELECT_ON: best[0],
        "fit_s": fit_seconds,
        **metrics_of(top, data.test, data.n_items),
        **cold_share(top, data),
        **cold_only,
        "curve": metrics_of(top, data.test, data.n_items, CURVE_KS),
    }


def run_twotower(cfg: DictConfig, data: PreparedData) -> tuple[dict[str, Any], Retriever]:
    """Train with the dataset's default config, then score test through the served bundle
    (returned too, for :func:`exposure_matched_row`)."""
    start = time.perf_counter()
    result = train(cfg)
    fit_seconds = time.perf_counter() - start
    assert result is not None
    retriever = Retriever.load(result.bundle)
    users = list(data.test.user_ids)
    rows = served_rows(retriever, users, data)
    cold_only = among_cold_metrics(
        lambda: served_rows(retriever, users, data, {ITEM_ID: list(data.split.cold_items)}), data
    )
    row = {
        "model": "twotower",
        "params": {"config": cfg.get("experiment_name", "default")},
        "val_" + SELECT_ON: result.metrics[f"val/{SELECT_ON}"],
        "fit_s": fit_seconds,
        **metrics_of(rows, data.test, data.n_items),
        **cold_share(rows, data),
        **cold_only,
        "curve": metrics_of(rows, data.test, data.n_items, CURVE_KS),
    }
    return row, retriever


def served_rows(
    retriever: Retriever,
    users: list,
    data: PreparedData,
    filter: dict | None = None,
    new_item_boost: float = 0.0,
) -> np.ndarray:
    """Top-50 catalogue rows the served bundle recommends to ``users`` (``filter`` and
    ``new_item_boost``: the Retriever's)."""
    ids, _ = retriever.recommend_batch(
        user_ids=users, k=50, filter=filter, new_item_boost=new_item_boost
    )
    return pd.Index(data.catalogue[ITEM_ID]).get_indexer(ids.ravel()).reshape(ids.shape)


def exposure_matching_boost(
    share_at: Callable[[float], float], target: float, steps: int = 24
) -> float:
    """The smallest boost in [-2, 2] (to 4 / 2**steps) at which ``share_at(boost)``, the
    new items' share of the top lists, reaches ``target``. Cosine scores lie in [-1, 1], so
    a boost of 2 ranks every new item first and -2 last: a model whose lists hold more new
    items than ``target`` gets a negative boost."""
    low, high = -2.0, 2.0
    if share_at(low) >= target:
        return low
    for _ in range(steps):
        middle = (low + high) / 2
        if share_at(middle) >= target:
            high = middle
        else:
            low = middle
    return high


def exposure_matched_row(
    twotower: dict[str, Any],
    rank: Callable[[float], np.ndarray],
    reference: dict[str, Any],
    data: PreparedData,
) -> dict[str, Any]:
    """twotower with the Retriever's ``new_item_boost`` set so that new items fill as much
    of its top-20s as they do in ``reference``'s (``cold_share@20``), scored on test:
    a comparison at equal new-item exposure, beside the protocol's own ranking (the boost
    is matched to another model's lists, not chosen on validation). ``rank(boost)``: the
    served top-50 rows of the test users."""
    target = float(reference["cold_share@20"])
    boost = exposure_matching_boost(lambda b: cold_share(rank(b), data)["cold_share@20"], target)
    rows = rank(boost)
    return {
        "model": "twotower_exposure_matched",
        "params": {"new_item_boost": round(boost, 5), "matched_to": reference["model"]},
        "fit_s": twotower["fit_s"],
        **metrics_of(rows, data.test, data.n_items),
        **cold_share(rows, data),
        **{k: v for k, v in twotower.items() if k.startswith("cold_only_")},
        "curve": metrics_of(rows, data.test, data.n_items, CURVE_KS),
    }


def run(
    cfg: DictConfig,
    models: Sequence[str] | None = None,
    twotower_cfg: DictConfig | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All requested models on the split of ``cfg``; returns rows and split statistics.

    ``twotower_cfg`` (default ``cfg``) trains twotower, e.g. with other features; it must
    make the same split (same ``split`` settings, seed and data)."""
    data = prepare(cfg)
    if twotower_cfg is not None and (split_settings(twotower_cfg) != split_settings(cfg)):
        raise ValueError("twotower_cfg must make the same split as cfg")
    matrices = build_matrices(data)
    try:
        import lightfm  # noqa: F401

        with_lightfm = True
    except ImportError:
        log.warning(
            "lightfm is not installed: its rows are skipped (see README, quality benchmark)"
        )
        with_lightfm = False
    grids = candidates(data, with_lightfm, bool(cfg.split.cold_items))
    default = (
        ["popularity", "random", "lightfm_hybrid", "twotower"]
        if cfg.split.cold_items
        else [*grids, "twotower"]
    )
    wanted = (
        list(models) if models else [m for m in default if m != "random" or cfg.split.cold_items]
    )
    rows = []
    retriever: Retriever | None = None
    for name in wanted:
        if name == "twotower":
            row, retriever = run_twotower(twotower_cfg or cfg, data)
            rows.append(row)
        elif name in grids:
            rows.append(run_baseline(name, grids[name], data, matrices))
        else:
            log.warning("unknown or unavailable model %s: skipped", name)
    by_name = {row["model"]: row for row in rows}
    if retriever is not None and EXPOSURE_REFERENCE in by_name and cfg.split.cold_items:
        users = list(data.test.user_ids)
        rows.append(
            exposure_matched_row(
                by_name["twotower"],
                lambda boost: served_rows(retriever, users, data, new_item_boost=boost),
                by_name[EXPOSURE_REFERENCE],
                data,
            )
        )
    stats = {
        **data.info,
        "test_users_scored": int(np.unique(data.test.target_users).size),
        "items": data.n_items,
    }
    return rows, stats
