"""Training throughput: a twotower epoch through Lightning next to a bare PyTorch loop.

Both loops drive the same model, loss, batches (the same pre-tensorised dataset and
sampler) and optimiser; the ratio isolates what Lightning costs. Each optimiser set-up
(dense Adam, fused Adam, sparse embeddings with SparseAdam or Adagrad) runs both ways.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from towers.data.datamodule import EpochBatchSampler, InteractionBatches
from towers.model.module import TwoTowerModule
from towers.model.optim import SparseDenseAdam
from towers.model.spec import TowerConfig
from twotower.encoding import FIRST_KNOWN_INDEX

log = logging.getLogger(__name__)


@dataclass
class BenchSettings:
    users: int = 100_000
    items: int = 50_000
    samples: int = 400_000
    dim: int = 64
    batch_size: int = 512
    history_length: int = 20
    steps: int = 200
    warmup_steps: int = 20
    seed: int = 0


OPTIMIZER_SETUPS: dict[str, tuple[bool, Callable[..., torch.optim.Optimizer]]] = {
    "adam": (False, functools.partial(torch.optim.Adam, lr=1e-3)),
    "adam_fused": (False, functools.partial(torch.optim.Adam, lr=1e-3, fused=True)),
    "sparse_adam": (True, functools.partial(SparseDenseAdam, lr=1e-3)),
    "sparse_adagrad": (True, functools.partial(torch.optim.Adagrad, lr=0.05)),
}


def synthetic_batches(s: BenchSettings) -> tuple[InteractionBatches, dict[str, Any]]:
    """Samples at benchmark scale: Zipf-popular items, histories, a few attributes each."""
    rng = np.random.default_rng(s.seed)
    popularity = 1.0 / np.arange(1, s.items + 1) ** 0.8
    popularity /= popularity.sum()
    item_rows = rng.choice(s.items, s.samples, p=popularity)
    history = rng.choice(s.items, (s.samples, s.history_length), p=popularity) + FIRST_KNOWN_INDEX
    history[rng.random((s.samples, s.history_length)) < 0.3] = 0
    user_inputs = {
        "user_id": rng.integers(FIRST_KNOWN_INDEX, s.users + FIRST_KNOWN_INDEX, s.samples),
        "user_cat": rng.integers(FIRST_KNOWN_INDEX, 12, (s.samples, 1)),
        "user_num": rng.normal(size=(s.samples, 1)).astype(np.float32),
        "history": history,
    }
    catalogue = {
        "item_id": np.arange(s.items) + FIRST_KNOWN_INDEX,
        "item_cat": rng.integers(FIRST_KNOWN_INDEX, 22, (s.items, 1)),
        "item_bag": rng.integers(0, 32, (s.items, 3)),
        "item_num": rng.normal(size=(s.items, 2)).astype(np.float32),
    }
    spec = {
        "items": {
            "prefix": "item",
            "id_size": s.items + FIRST_KNOWN_INDEX,
            "use_id": True,
            "categorical_sizes": [22],
            "bag_sizes": [32],
            "bag_widths": [3],
            "n_numeric": 2,
        },
        "users": {
            "prefix": "user",
            "id_size": s.users + FIRST_KNOWN_INDEX,
            "use_id": True,
            "categorical_sizes": [12],
            "bag_sizes": [],
            "bag_widths": [],
            "n_numeric": 1,
        },
        "history_length": s.history_length,
    }
    return InteractionBatches(user_inputs, item_rows, catalogue), spec


def build_module(spec: dict[str, Any], s: BenchSettings, setup: str) -> TwoTowerModule:
    sparse, optimizer = OPTIMIZER_SETUPS[setup]
    torch.manual_seed(s.seed)
    towers = TowerConfig(
        embedding_dim=s.dim, hidden=[128], output_dim=s.dim, sparse_embeddings=sparse
    )
    module = TwoTowerModule(spec, s.items, towers, optimizer=optimizer, seed=s.seed)
    module.set_item_log_p(np.full(s.items, -np.log(s.items), dtype=np.float32))
    return module


def loader(dataset: InteractionBatches, s: BenchSettings) -> DataLoader:
    return DataLoader(
        dataset, sampler=EpochBatchSampler(len(dataset), s.batch_size, s.seed), batch_size=None
    )


def bare_loop(module: TwoTowerModule, dataset: InteractionBatches, s: BenchSettings) -> float:
    """Examples/second of a plain loop: zero_grad, forward, loss, backward, step."""
    optimizer = module.configure_optimizers()
    module.train()
    start = 0.0
    for step, batch in enumerate(loader(dataset, s)):
        if step == s.warmup_steps:
            start = time.perf_counter()
        if step == s.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        module.model_step(batch).backward()
        optimizer.step()
    return (s.steps - s.warmup_steps) * s.batch_size / (time.perf_counter() - start)


class _StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.end = time.perf_counter()


def lightning_loop(module: TwoTowerModule, dataset: InteractionBatches, s: BenchSettings) -> float:
    """Examples/second of ``Trainer.fit`` on the same data (logging on, checkpoints off)."""
    timer = _StepTimer(s.warmup_steps)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=s.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=loader(dataset, s))
    return (s.steps - s.warmup_steps) * s.batch_size / (timer.end - timer.start)


def run(s: BenchSettings, setups: list[str], rounds: int = 3) -> list[dict[str, Any]]:
    """Bare and Lightning loops alternate ``rounds`` times per set-up; medians are reported."""
    dataset, spec = synthetic_batches(s)
    # One short unmeasured run first, so the first set-up does not pay for warm-up.
    bare_loop(
        build_module(spec, s, setups[0]), dataset, dataclasses.replace(s, steps=s.warmup_steps + 5)
    )
    rows = []
    for setup in setups:
        bare, lightning = [], []
        for _ in range(rounds):
            bare.append(bare_loop(build_module(spec, s, setup), dataset, s))
            lightning.append(lightning_loop(build_module(spec, s, setup), dataset, s))
        row = {
            "setup": setup,
            "bare_examples_per_s": float(np.median(bare)),
            "lightning_examples_per_s": float(np.median(lightning)),
            "rounds": rounds,
        }
        row["lightning_over_bare"] = row["lightning_examples_per_s"] / row["bare_examples_per_s"]
        log.info("%s", row)
        rows.append(row)
    fastest = max(r["bare_examples_per_s"] for r in rows)
    for row in rows:
        row["bare_vs_fastest"] = row["bare_examples_per_s"] / fastest
    return rows
