"""Lightning callback: full-ranking validation metrics every N epochs (for checkpointing)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from towers.data.eval_sets import EvalSet, EvalSource
from towers.evaluation.metrics import DEFAULT_KS
from towers.evaluation.ranking import (
    STREAM_USERS,
    Scorer,
    dot_scores,
    evaluate_popularity,
    evaluate_stream,
    evaluate_vectors,
    scores_by_user,
    vector_scorer,
)
from towers.model.module import TwoTowerModule, embed

# Every process computes the same full-ranking metrics, so there is nothing to sync.
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")


def tower_scorer(user_tower: torch.nn.Module, item_vectors: np.ndarray) -> Scorer:
    """A scorer for :func:`evaluate_stream`: each piece's users embedded by
    ``user_tower``, scored against ``item_vectors``."""
    return vector_scorer(lambda inputs: embed(user_tower, inputs), item_vectors)


def evaluate_module(
    module: TwoTowerModule,
    catalogue_inputs: dict,
    eval_set: EvalSet | EvalSource,
    ks: Sequence[int] = DEFAULT_KS,
    prefix: str = "",
) -> dict[str, float]:
    """Embed the catalogue and the users of ``eval_set`` and score them by full ranking
    (the users of an :class:`EvalSource` a piece at a time: :func:`evaluate_stream`)."""
    item_vectors = embed(module.model.item_tower, catalogue_inputs)
    if isinstance(eval_set, EvalSource):
        scorer = tower_scorer(module.model.user_tower, item_vectors)
        return evaluate_stream(eval_set, scorer, len(item_vectors), ks, prefix)
    user_vectors = embed(module.model.user_tower, eval_set.user_inputs)
    return evaluate_vectors(user_vectors, item_vectors, eval_set, ks, prefix)


def module_scores_by_user(
    module: TwoTowerModule,
    catalogue_inputs: dict,
    eval_set: EvalSet,
    ks: Sequence[int] = DEFAULT_KS,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`evaluate_module`'s ranking, kept per user: the ids of the users with
    targets and each one's metrics (:func:`towers.evaluation.ranking.scores_by_user`),
    for paired comparisons of two models on the same users."""
    item_vectors = embed(module.model.item_tower, catalogue_inputs)
    user_vectors = embed(module.model.user_tower, eval_set.user_inputs)
    return scores_by_user(dot_scores(user_vectors, item_vectors), len(item_vectors), eval_set, ks)


class RankingEvaluation(pl.Callback):
    """Logs ``val/recall@K``, ``val/ndcg@K``, ... (and the popularity baseline once)."""

    def __init__(
        self,
        catalogue_inputs: dict,
        eval_set: EvalSet | EvalSource,
        ks: Sequence[int] = DEFAULT_KS,
        every_n_epochs: int = 1,
    ) -> None:
        self.catalogue_inputs = catalogue_inputs
        if isinstance(eval_set, EvalSource) and eval_set.n_users <= STREAM_USERS:
            eval_set = eval_set.materialise()  # one piece: built once, not every epoch
        self.eval_set = eval_set
        self.ks = list(ks)
        self.every_n_epochs = every_n_epochs

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        baseline = evaluate_popularity(self.eval_set, self.ks, prefix="val_popularity/")
        for logger in trainer.loggers:
            logger.log_metrics(
                {k: v for k, v in baseline.items() if not k.endswith("users")}, step=0
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        assert isinstance(pl_module, TwoTowerModule)
        metrics = evaluate_module(pl_module, self.catalogue_inputs, self.eval_set, self.ks, "val/")
        headline = metrics.pop("val/recall@20", None)
        pl_module.log_dict({k: v for k, v in metrics.items() if not k.endswith("users")})
        if headline is not None:
            pl_module.log("val/recall@20", headline, prog_bar=True)
