"""LightningDataModule serving pre-tensorised batches (no per-row Python in the hot path)."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from towers.data.prepare import PreparedData

Batch = dict[str, dict[str, Tensor] | Tensor]


def to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """numpy inputs -> torch tensors (int64 indices, float32 numbers), without copying."""
    return {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in arrays.items()}


class InteractionBatches(Dataset[Batch]):
    """Training samples; indexing with a list of positions returns a whole batch at once."""

    def __init__(self, data: PreparedData) -> None:
        self.user_inputs = to_tensors(data.sample_user_inputs)
        self.item_rows = torch.from_numpy(data.sample_item_rows)
        self.weights = torch.from_numpy(data.sample_weights)
        self.catalogue = to_tensors(data.catalogue_inputs)

    def __len__(self) -> int:
        return len(self.item_rows)

    def __getitem__(self, positions: list[int]) -> Batch:  # type: ignore[override]
        index = torch.as_tensor(positions, dtype=torch.int64)
        item_rows = self.item_rows[index]
        return {
            "user": {name: values[index] for name, values in self.user_inputs.items()},
            "item": {name: values[item_rows] for name, values in self.catalogue.items()},
            "item_rows": item_rows,
            "weights": self.weights[index],
        }


class TwoTowerDataModule(pl.LightningDataModule):
    """Shuffled batches of (user inputs, item inputs) built from :class:`PreparedData`."""

    def __init__(self, data: PreparedData, batch_size: int = 512, seed: int = 0) -> None:
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.dataset = InteractionBatches(data)

    def train_dataloader(self) -> DataLoader[Batch]:
        generator = torch.Generator().manual_seed(self.seed)
        sampler = BatchSampler(
            RandomSampler(self.dataset, generator=generator), self.batch_size, drop_last=False
        )
        return DataLoader(self.dataset, sampler=sampler, batch_size=None)
