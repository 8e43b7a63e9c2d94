"""LightningDataModule serving pre-tensorised batches (no per-row Python in the hot path).

Batches are cut from a permutation seeded by (seed, epoch), so an epoch's batches do
not depend on what ran before: resuming from a checkpoint replays the same batches,
and under DDP each process takes an equal, disjoint share of the same permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from towers.data.prepare import PreparedData
from towers.data.samples import HistorySource

Batch = dict[str, dict[str, Tensor] | Tensor]


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """numpy inputs -> torch tensors (int64 indices, float32 numbers), without copying."""
    return {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in arrays.items()}


@dataclass(frozen=True)
class BatchRequest:
    """Which samples make up batch ``number`` of ``epoch`` (``positions`` within
    ``group``: the whole sample set in memory, or one group of streamed shards)."""

    epoch: int
    number: int
    positions: np.ndarray
    group: int = 0


class EpochBatchSampler(Sampler[BatchRequest]):
    """Batches of a (seed, epoch)-seeded permutation, sharded evenly across processes."""

    def __init__(
        self,
        n_samples: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    @property
    def per_process(self) -> int:
        return self.n_samples // self.world_size

    def __len__(self) -> int:
        return -(-self.per_process // self.batch_size)

    def permutation(self, n: int, *key: int) -> np.ndarray:
        """``0..n-1`` in an order seeded by (seed, epoch, *key); as they are without
        shuffling."""
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng((self.seed, self.epoch, *key)).permutation(n)

    def share(self, order: np.ndarray) -> np.ndarray:
        """This process's equal, disjoint part of ``order`` (``len // world_size``)."""
        return order[self.rank :: self.world_size][: len(order) // self.world_size]

    def __iter__(self) -> Iterator[BatchRequest]:
        share = self.share(self.permutation(self.n_samples))
        for number, lo in enumerate(range(0, len(share), self.batch_size)):
            yield BatchRequest(self.epoch, number, share[lo : lo + self.batch_size])


class InteractionBatches(Dataset[Batch]):
    """Training samples; one ``BatchRequest`` returns a whole batch at once.

    ``user_inputs`` hold one row per sample, ``item_rows`` each sample's catalogue row,
    ``catalogue_inputs`` one row per catalogue item. With ``mixed_negatives > 0`` each
    batch also carries that many items drawn uniformly (seeded by epoch and batch) from
    the items seen in training (``item_rows``), never from items held out of training.
    With a ``history_source`` each batch builds its samples' histories from it (so they
    are never all in memory at once); with ``target_horizon > 1`` each is cut a random
    0..horizon-1 events earlier (seeded by epoch and batch): the target is then any of
    the user's next ``target_horizon`` events. Without one, ``user_inputs`` hold them.
    With ``user_rows``, ``user_inputs`` hold one row per user and sample ``i`` takes row
    ``user_rows[i]``; without, they hold one row per sample.
    """

    def __init__(
        self,
        user_inputs: dict[str, np.ndarray],
        item_rows: np.ndarray,
        catalogue_inputs: dict[str, np.ndarray],
        weights: np.ndarray | None = None,
        mixed_negatives: int = 0,
        seed: int = 0,
        history_source: HistorySource | None = None,
        target_horizon: int = 1,
        user_rows: np.ndarray | None = None,
        negative_pool: np.ndarray | None = None,
    ) -> None:
        if target_horizon < 1:
            raise ValueError(f"target_horizon must be >= 1, got {target_horizon}")
        if target_horizon > 1 and history_source is None:
            raise ValueError("target_horizon > 1 needs a history_source")
        self.history_source = history_source
        self.target_horizon = target_horizon
        self.user_inputs = to_tensors(user_inputs)
        self.user_rows = None if user_rows is None else torch.from_numpy(np.asarray(user_rows))
        self.item_rows = torch.from_numpy(np.asarray(item_rows, dtype=np.int64))
        if weights is None:
            weights = np.ones(len(item_rows), dtype=np.float32)
        self.weights = torch.from_numpy(np.asarray(weights, dtype=np.float32))
        self.catalogue = to_tensors(catalogue_inputs)
        self.mixed_negatives = mixed_negatives
        # the items mixed negatives come from (default: those of ``item_rows``)
        self.negative_pool = np.unique(item_rows) if negative_pool is None else negative_pool
        self.seed = seed

    @classmethod
    def from_prepared(
        cls, data: PreparedData, mixed_negatives: int = 0, seed: int = 0, target_horizon: int = 1
    ) -> InteractionBatches:
        if data.sample_stream is not None:
            raise ValueError(
                "the samples of this data stream from shards: use "
                "towers.data.shard_stream.ShardBatches (towers.pipeline.build_datamodule)"
            )
        return cls(
            data.sample_user_inputs,
            data.sample_item_rows,
            data.catalogue_inputs,
            data.sample_weights,
            mixed_negatives,
            seed,
            data.sample_histories,
            target_horizon,
            data.sample_user_rows,
        )

    def __len__(self) -> int:
        return len(self.item_rows)

    def batch_sampler(
        self, batch_size: int, seed: int, world_size: int = 1, rank: int = 0
    ) -> EpochBatchSampler:
        """This process's share of each epoch's batches of these samples."""
        return EpochBatchSampler(len(self), batch_size, seed, True, world_size, rank)

    def item_inputs(self, rows: Tensor) -> dict[str, Tensor]:
        return {name: values[rows] for name, values in self.catalogue.items()}

    def __getitem__(self, request: BatchRequest) -> Batch:  # type: ignore[override]
        index = torch.from_numpy(np.asarray(request.positions, dtype=np.int64))
        item_rows = self.item_rows[index]
        users = index if self.user_rows is None else self.user_rows[index].long()
        batch: Batch = {
            "user": {name: values[users] for name, values in self.user_inputs.items()},
            "item": self.item_inputs(item_rows),
            "item_rows": item_rows,
            "weights": self.weights[index],
        }
        if self.history_source is not None:  # plain windows at horizon 1
            rng = np.random.default_rng((self.seed, request.epoch, request.number, 2))
            windows = self.history_source.windows(request.positions, self.target_horizon, rng)
            batch["user"]["history"] = torch.from_numpy(windows)  # type: ignore[index]
        if self.mixed_negatives:
            rng = np.random.default_rng((self.seed, request.epoch, request.number, 1))
            rows = torch.from_numpy(rng.choice(self.negative_pool, self.mixed_negatives))
            batch["negative_rows"] = rows
            batch["negatives"] = self.item_inputs(rows)
        return batch


class BatchSource(Protocol):
    """A dataset of whole batches and the sampler of their requests: the samples in
    memory (:class:`InteractionBatches`) or streamed from shards
    (:class:`towers.data.shard_stream.ShardBatches`)."""

    negative_pool: np.ndarray

    def __getitem__(self, request: BatchRequest) -> Batch: ...

    def batch_sampler(
        self, batch_size: int, seed: int, world_size: int = 1, rank: int = 0
    ) -> Sampler[BatchRequest]: ...


class TwoTowerDataModule(pl.LightningDataModule):
    """Shuffled batches of (user inputs, item inputs) from a :class:`BatchSource`."""

    def __init__(self, dataset: BatchSource, batch_size: int = 512, seed: int = 0) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed

    @classmethod
    def from_prepared(
        cls,
        data: PreparedData,
        batch_size: int = 512,
        seed: int = 0,
        mixed_negatives: int = 0,
        target_horizon: int = 1,
    ) -> TwoTowerDataModule:
        dataset = InteractionBatches.from_prepared(data, mixed_negatives, seed, target_horizon)
        return cls(dataset, batch_size, seed)

    @property
    def negative_pool_size(self) -> int:
        return len(self.dataset.negative_pool)

    def sampler(self) -> Sampler[BatchRequest]:
        """This process's share of each epoch's batches."""
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        return self.dataset.batch_sampler(self.batch_size, self.seed, world_size, rank)

    def teardown(self, stage: str) -> None:
        """After fitting: let a streamed source drop the shards it holds."""
        release = getattr(self.dataset, "release", None)
        if callable(release):
            release()

    def train_dataloader(self) -> DataLoader[Batch]:
        return DataLoader(self.dataset, sampler=self.sampler(), batch_size=None)  # type: ignore[arg-type]
