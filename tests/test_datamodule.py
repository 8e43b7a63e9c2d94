"""Batches: seeded per epoch, sharded evenly under DDP, negatives only from training items."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from towers.data.datamodule import EpochBatchSampler, InteractionBatches
from towers.data.prepare import FeatureSettings, prepare_data
from towers.data.schema import RawData
from towers.data.split import make_split, prepare_interactions


def positions(sampler: EpochBatchSampler) -> list[list[int]]:
    return [list(request.positions) for request in sampler]


def flatten(batches: list[list[int]]) -> list[int]:
    return [position for batch in batches for position in batch]


def test_an_epochs_batches_depend_only_on_seed_and_epoch() -> None:
    first, second = EpochBatchSampler(103, 10, seed=5), EpochBatchSampler(103, 10, seed=5)
    first.set_epoch(3)
    second.set_epoch(1)
    assert positions(first) != positions(second)
    second.set_epoch(3)
    assert positions(first) == positions(second)
    assert sorted(flatten(positions(first))) == list(range(103))
    assert len(first) == 11


def test_processes_get_equal_disjoint_shares() -> None:
    shards = [EpochBatchSampler(103, 10, seed=5, world_size=2, rank=r) for r in (0, 1)]
    batches = [positions(s) for s in shards]
    assert [len(b) for b in batches[0]] == [len(b) for b in batches[1]]
    flat = [set(flatten(b)) for b in batches]
    assert not flat[0] & flat[1] and len(flat[0]) == len(flat[1]) == 51


@pytest.fixture
def cold_prepared(tiny_data: RawData):
    split = make_split(prepare_interactions(tiny_data.interactions), cold_items=True, seed=2)
    return prepare_data(tiny_data, split, FeatureSettings(history_length=5))


def test_mixed_negatives_never_come_from_cold_items(cold_prepared) -> None:
    dataset = InteractionBatches.from_prepared(cold_prepared, mixed_negatives=64, seed=0)
    cold_rows = set(
        np.flatnonzero(cold_prepared.catalogue["item_id"].isin(set(cold_prepared.split.cold_items)))
    )
    assert cold_rows and not cold_rows & set(dataset.negative_pool)
    sampler = EpochBatchSampler(len(dataset), 32, seed=0)
    for request in sampler:
        batch = dataset[request]
        assert not cold_rows & set(batch["negative_rows"].tolist())
        assert batch["negatives"]["item_id"].shape == (64,)


def test_batch_item_inputs_are_the_catalogue_rows(cold_prepared) -> None:
    dataset = InteractionBatches.from_prepared(cold_prepared)
    batch = dataset[next(iter(EpochBatchSampler(len(dataset), 16)))]
    rows = batch["item_rows"].numpy()
    for name, values in cold_prepared.catalogue_inputs.items():
        np.testing.assert_array_equal(batch["item"][name].numpy(), values[rows])


def test_target_horizon_rebuilds_histories_per_epoch(cold_prepared) -> None:
    plain = InteractionBatches.from_prepared(cold_prepared)
    far = InteractionBatches.from_prepared(cold_prepared, target_horizon=5)
    sampler = EpochBatchSampler(len(plain), 64, seed=0)
    request = next(iter(sampler))
    near_history = plain[request]["user"]["history"].numpy()
    far_history = far[request]["user"]["history"].numpy()
    np.testing.assert_array_equal(far_history, far[request]["user"]["history"].numpy())
    assert (far_history != near_history).any()
    # a cut history never holds more items than the plain one
    assert ((far_history != 0).sum(axis=1) <= (near_history != 0).sum(axis=1)).all()
    with pytest.raises(ValueError, match="target_horizon"):
        InteractionBatches.from_prepared(cold_prepared, target_horizon=0)


def test_user_inputs_kept_per_user_give_the_batches_of_per_sample_inputs(
    tiny_data: RawData,
) -> None:
    split = make_split(prepare_interactions(tiny_data.interactions))
    data = prepare_data(tiny_data, split, FeatureSettings(history_length=5))
    assert data.sample_user_rows is not None
    assert len(data.sample_user_inputs["user_id"]) < data.n_samples  # one row per user
    per_user = InteractionBatches.from_prepared(data, mixed_negatives=4, seed=2)
    per_sample = InteractionBatches(
        data.user_inputs_of_samples(),
        data.sample_item_rows,
        data.catalogue_inputs,
        data.sample_weights,
        4,
        2,
        data.sample_histories,
    )
    sampler = EpochBatchSampler(data.n_samples, 32, seed=2)
    sampler.set_epoch(1)
    for request in list(sampler)[:5]:
        ours, theirs = per_user[request], per_sample[request]
        for name, values in theirs["user"].items():
            assert torch.equal(ours["user"][name], values), name
        assert torch.equal(ours["item_rows"], theirs["item_rows"])
        assert torch.equal(ours["negative_rows"], theirs["negative_rows"])
