"""The LightningModule: one shared model step, sampled softmax, config-built optimiser."""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from towers.model.loss import candidate_log_q, in_batch_softmax_loss
from towers.model.spec import LossConfig, ModelConfig, TowerConfig, TowerSpec
from towers.model.towers import TwoTowerModel
from towers.model.warm_start import ENCODERS_KEY
from twotower.encoding import FeatureEncoders

# The module moves its own batches (see transfer_batch_to_device); Lightning warns that a
# datamodule is also present, which is expected here.
warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device`.*")

log = logging.getLogger(__name__)
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
MIN_TEMPERATURE = 0.01
LEGACY_HISTORY_KEY = re.compile(r"^(model\.user_tower\.(?:members\.\d+\.)?)item_embedding\.")


def gather_keeping_local_grad(module: pl.LightningModule, tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every process; only the local slice carries gradients."""
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return tensor
    gathered = module.all_gather(tensor.detach())  # (world, n, ...)
    parts = list(gathered.unbind(0))
    parts[trainer.global_rank] = tensor
    return torch.cat(parts)


class TwoTowerModule(pl.LightningModule):
    """Trains :class:`TwoTowerModel` with sampled softmax, logQ correction and hit masking.

    Under DDP the users, items and negatives of all processes are gathered, each process
    computes the loss of the global batch with gradients through its own slice, and the
    loss is scaled by the world size, so that N processes train like one with N x batch.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        n_catalogue_items: int,
        towers: TowerConfig | None = None,
        loss: LossConfig | None = None,
        negative_pool_size: int = 0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        seed: int = 0,
    ) -> None:
        """``spec``: the input sizes (:class:`TowerSpec` as a dict, so it travels in
        checkpoints); ``towers`` / ``loss``: the typed config (defaults if None);
        ``negative_pool_size``: items the mixed negatives are drawn from (0: in-batch only);
        ``optimizer`` / ``scheduler``: factories finished in ``configure_optimizers``."""
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.towers = towers or TowerConfig()
        self.loss = loss or LossConfig()
        self.model = TwoTowerModel(TowerSpec.from_dict(spec), self.towers)
        self.log_temperature = nn.Parameter(
            torch.tensor(math.log(self.loss.temperature)),
            requires_grad=self.loss.learn_temperature,
        )
        self.register_buffer("item_log_p", torch.zeros(n_catalogue_items))
        self._epoch_loss = torch.zeros(())
        self._epoch_steps = 0
        self._epoch_started = time.perf_counter()
        # the encoders the embedding rows are keyed by: saved in checkpoints, so a later
        # run can warm-start from one (towers.model.warm_start)
        self.feature_encoders: FeatureEncoders | None = None

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        spec: TowerSpec,
        n_catalogue_items: int,
        negative_pool_size: int = 0,
        seed: int = 0,
    ) -> TwoTowerModule:
        """The module a :class:`ModelConfig` describes, sized by ``spec``."""
        return cls(
            spec.to_dict(),
            n_catalogue_items,
            config.towers,
            config.loss,
            negative_pool_size,
            config.optimizer,
            config.scheduler,
            config.scheduler_interval,
            seed,
        )

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp().clamp(min=MIN_TEMPERATURE, max=1.0)

    def set_item_log_p(self, log_p: np.ndarray) -> None:
        """Log share of every catalogue item among the training positives."""
        self.item_log_p.copy_(torch.as_tensor(log_p, dtype=torch.float32))

    def model_step(self, batch: dict[str, Any]) -> Tensor:
        users = gather_keeping_local_grad(self, self.model.user_tower(batch["user"]))
        items = gather_keeping_local_grad(self, self.model.item_tower(batch["item"]))
        rows = gather_keeping_local_grad(self, batch["item_rows"])
        weights = gather_keeping_local_grad(self, batch["weights"])
        n_negatives = 0
        if "negatives" in batch:
            negatives = gather_keeping_local_grad(self, self.model.item_tower(batch["negatives"]))
            negative_rows = gather_keeping_local_grad(self, batch["negative_rows"])
            n_negatives = len(negative_rows)
            items = torch.cat([items, negatives])
            candidate_rows = torch.cat([rows, negative_rows])
        else:
            candidate_rows = rows
        log_q = None
        if self.loss.logq_correction:
            pool = self.hparams.negative_pool_size
            log_q = self.loss.logq_weight * candidate_log_q(
                self.item_log_p[rows], n_negatives, pool
            )
        loss = in_batch_softmax_loss(
            users,
            items,
            self.temperature,
            item_ids=candidate_rows if self.loss.remove_accidental_hits else None,
            item_log_q=log_q,
            weights=weights,
        )
        return loss

    def on_train_start(self) -> None:
        if self.towers.ensemble > 1:
            raise ValueError(
                "an ensemble (model.ensemble > 1) is trained member by member and assembled "
                "(towers.pipeline.train_ensemble), not as one module"
            )

    def on_train_epoch_start(self) -> None:
        self._epoch_loss = torch.zeros((), device=self.device)
        self._epoch_steps = 0
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        if not self._epoch_steps:
            return
        mean_loss = self._epoch_loss / self._epoch_steps
        self.log("train/loss_epoch", mean_loss, sync_dist=True)
        trainer = self._trainer
        if trainer is not None and trainer.is_global_zero:
            # one line per epoch through logging, for runs whose output is redirected
            # (the progress bar is for terminals); validation metrics were logged by the
            # RankingEvaluation callback, which runs before this hook
            shown = {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if k in ("val/recall@20", "val/ndcg@20")
            }
            log.info(
                "epoch %d/%d: loss %.4f%s, %.1f s",
                trainer.current_epoch + 1,
                trainer.max_epochs,
                float(mean_loss),
                "".join(f", {k} {v:.4f}" for k, v in shown.items()),
                time.perf_counter() - self._epoch_started,
            )

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # Batches are built on the CPU; walking them to "move" to the CPU is wasted time.
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def optimizer_zero_grad(
        self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients are released in on_train_batch_start instead: before the forward pass,
        # not between forward and backward, so their memory is reused by this step (with
        # large dense embedding tables this is worth ~10% of a step).
        return

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        trainer = self._trainer
        if trainer is not None and batch_idx % trainer.accumulate_grad_batches == 0:
            for optimizer in trainer.optimizers:
                optimizer.zero_grad(set_to_none=True)
        # Dropout and item-id dropout are the only consumers of torch's global RNG in
        # training; seeding it by step makes a resumed run draw the same masks.
        # (Negatives use their own seeds.)
        if self.towers.dropout > 0 or self.towers.item_id_dropout > 0:
            rank = self._trainer.global_rank if self._trainer is not None else 0
            torch.manual_seed(self.hparams.seed * 1_000_003 + self.global_step * 101 + rank)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.model_step(batch)
        # self.log costs a few % of a fast step: log every `log_every_n_steps` steps and
        # keep the epoch mean in a plain running sum instead.
        self._epoch_loss = self._epoch_loss + loss.detach()
        self._epoch_steps += 1
        every = self._trainer.log_every_n_steps if self._trainer is not None else 1
        if batch_idx % max(every, 1) == 0:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
            if self.loss.learn_temperature:
                self.log("train/temperature", self.temperature, on_step=True, on_epoch=False)
        # Under DDP gradients are averaged over processes; each process's loss covers the
        # global batch through its own slice, so scaling by the world size makes the
        # averaged gradient that of one process with the whole global batch.
        world_size = self._trainer.world_size if self._trainer is not None else 1
        return loss * world_size

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the feature encoders (when set) beside the weights."""
        if self.feature_encoders is not None:
            checkpoint[ENCODERS_KEY] = self.feature_encoders.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the feature encoders, if saved; read checkpoints written before history
        items had their own embedder, where the user tower's shared id table was
        ``user_tower.item_embedding``."""
        if checkpoint.get(ENCODERS_KEY) is not None:
            self.feature_encoders = FeatureEncoders.from_dict(checkpoint[ENCODERS_KEY])
        state = checkpoint.get("state_dict", {})
        for key in list(state):
            renamed = LEGACY_HISTORY_KEY.sub(r"\1history_embedding.item_embedding.", key)
            if renamed != key:
                state[renamed] = state.pop(key)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters; sparse embedding tables in their own ``sparse=True`` group."""
        sparse = [
            m.weight
            for m in self.modules()
            if isinstance(m, nn.Embedding) and m.sparse and m.weight.requires_grad
        ]
        sparse_ids = {id(p) for p in sparse}
        dense = [p for p in self.parameters() if p.requires_grad and id(p) not in sparse_ids]
        groups = [{"params": dense}]
        if sparse:
            groups.append({"params": sparse, "sparse": True})
        return groups

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``trainer.gradient_clip_val`` clips the dense gradients; sparse embedding
        gradients (``sparse_embeddings=true``) are left as they are."""
        if not gradient_clip_val:
            return
        dense = [p for p in self.parameters() if p.grad is not None and not p.grad.is_sparse]
        if gradient_clip_algorithm == "value":
            nn.utils.clip_grad_value_(dense, gradient_clip_val)
        else:
            nn.utils.clip_grad_norm_(dense, gradient_clip_val)

    def configure_optimizers(self) -> Any:
        factory = self.hparams.optimizer or torch.optim.Adam
        optimizer = factory(params=self.parameter_groups())
        if self.hparams.scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.hparams.scheduler(optimizer=optimizer),
                "interval": self.hparams.scheduler_interval,
            },
        }


@torch.no_grad()
def embed(tower: nn.Module, inputs: dict[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
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
