"""The LightningModule: one shared model step, in-batch softmax, config-built optimiser."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from towers.model.loss import in_batch_softmax_loss
from towers.model.towers import TowerSpec, TwoTowerModel

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class TwoTowerModule(pl.LightningModule):
    """Trains :class:`TwoTowerModel` with in-batch negatives, logQ correction and hit masking."""

    def __init__(
        self,
        spec: dict[str, Any],
        n_catalogue_items: int,
        embedding_dim: int = 64,
        hidden: Sequence[int] = (128,),
        output_dim: int = 64,
        dropout: float = 0.0,
        share_item_embedding: bool = True,
        temperature: float = 0.1,
        logq_correction: bool = True,
        remove_accidental_hits: bool = True,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.model = TwoTowerModel(
            TowerSpec.from_dict(spec),
            embedding_dim,
            list(hidden),
            output_dim,
            dropout,
            share_item_embedding,
        )
        self.register_buffer("item_log_q", torch.zeros(n_catalogue_items))

    def set_item_log_q(self, log_q: np.ndarray) -> None:
        """Log sampling probability of every catalogue item among the training positives."""
        self.item_log_q.copy_(torch.as_tensor(log_q, dtype=torch.float32))

    def model_step(self, batch: dict[str, Any]) -> Tensor:
        user_vectors = self.model.user_tower(batch["user"])
        item_vectors = self.model.item_tower(batch["item"])
        rows = batch["item_rows"]
        return in_batch_softmax_loss(
            user_vectors,
            item_vectors,
            self.hparams.temperature,
            item_ids=rows if self.hparams.remove_accidental_hits else None,
            item_log_q=self.item_log_q[rows] if self.hparams.logq_correction else None,
            weights=batch["weights"],
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.model_step(batch)
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(batch["item_rows"]),
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        factory = self.hparams.optimizer or torch.optim.Adam
        return factory(params=self.parameters())


@torch.no_grad()
def embed(
    tower: torch.nn.Module, inputs: dict[str, np.ndarray], batch_size: int = 8192
) -> np.ndarray:
    """Run a tower over numpy inputs in batches; returns float32 (n, d) vectors."""
    was_training = tower.training
    tower.eval()
    n = len(next(iter(inputs.values())))
    device = next(tower.parameters()).device
    chunks = []
    for lo in range(0, n, batch_size):
        batch = {
            k: torch.from_numpy(np.ascontiguousarray(v[lo : lo + batch_size])).to(device)
            for k, v in inputs.items()
        }
        chunks.append(tower(batch).float().cpu().numpy())
    tower.train(was_training)
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
