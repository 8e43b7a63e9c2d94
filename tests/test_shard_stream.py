"""Training batches streamed from sample shards: the same batches as the samples in memory,
seeded per (seed, epoch), shared evenly across processes, one group of shards at a time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from towers.data.datamodule import BatchRequest, InteractionBatches, TwoTowerDataModule
from towers.data.prepare import FeatureSettings, PreparedData, prepare_data
from towers.data.prepared_writer import PreparedParts, write_samples
from towers.data.samples import user_activity_weights
from towers.data.schema import RawData
from towers.data.shard_stream import (
    SampleShards,
    SampleStats,
    SampleStream,
    ShardBatches,
    ShardEpochSampler,
)
from towers.data.split import make_split, prepare_interactions
from twotower.errors import PreparedDataError
from twotower.spark import shards

ROWS_PER_SHARD = 97  # several shards, users cut across them


def write_sample_shards(data: PreparedData, directory: Path, rows: int = ROWS_PER_SHARD) -> Path:
    """``data``'s samples in the ``samples/`` format (docs/spark.md), ``rows`` per file,
    as ``twotower prepare`` writes them."""
    parts = PreparedParts.of(data)
    write_samples(directory, data.split.fit, parts.samples, parts.encoders, rows)
    return directory


@pytest.fixture
def data(tiny_data: RawData) -> PreparedData:
    split = make_split(prepare_interactions(tiny_data.interactions))
    return prepare_data(tiny_data, split, FeatureSettings(history_length=6))


@pytest.fixture
def stream(data: PreparedData, tmp_path: Path) -> SampleStream:
    sample_shards = SampleShards.open(str(write_sample_shards(data, tmp_path / "samples")))
    return SampleStream(sample_shards, SampleStats.scan(sample_shards, data.n_items))


def streamed(data: PreparedData, stream: SampleStream, **settings) -> ShardBatches:
    return ShardBatches(
        stream,
        data.encoders.user_input_names,
        data.catalogue_inputs,
        data.encoders.history_length,
        **settings,
    )


def global_positions(batches: ShardBatches, request: BatchRequest) -> np.ndarray:
    return batches.group_samples(request.group)[np.asarray(request.positions)]


def test_the_shards_are_read_back_as_written(data: PreparedData, stream: SampleStream) -> None:
    assert stream.n_samples == data.n_samples
    assert len(stream.shards.files) == -(-data.n_samples // ROWS_PER_SHARD)
    assert stream.shards.files[1].first == ROWS_PER_SHARD
    np.testing.assert_array_equal(
        stream.stats.item_counts, np.bincount(data.sample_item_rows, minlength=data.n_items)
    )
    np.testing.assert_array_equal(
        stream.shards.item_codes(50, 250), data.sample_histories.item_codes[50:250]
    )


def stream_of(data: PreparedData, directory: Path, rows: int) -> SampleStream:
    sample_shards = SampleShards.open(str(write_sample_shards(data, directory, rows)))
    return SampleStream(sample_shards, SampleStats.scan(sample_shards, data.n_items))


@pytest.mark.parametrize(
    ("horizon", "rows"),
    [(1, ROWS_PER_SHARD), (4, ROWS_PER_SHARD), (4, 4)],  # 4 rows: histories span 3 files
)
def test_streamed_batches_equal_the_in_memory_batches_of_the_same_samples(
    data: PreparedData, tmp_path: Path, horizon: int, rows: int
) -> None:
    """Every tensor of every streamed batch (user inputs, histories cut back across shard
    edges, items, weights, mixed negatives) equals the in-memory batch of the same
    samples, epoch and batch number."""
    stream = stream_of(data, tmp_path / "samples", rows)
    ours = streamed(data, stream, mixed_negatives=8, seed=4, target_horizon=horizon, group_shards=2)
    theirs = InteractionBatches.from_prepared(
        data, mixed_negatives=8, seed=4, target_horizon=horizon
    )
    assert len(ours.groups) > 2
    np.testing.assert_array_equal(ours.negative_pool, theirs.negative_pool)
    sampler = ours.batch_sampler(batch_size=32, seed=4)
    sampler.set_epoch(2)
    compared = 0
    for request in sampler:
        mine = ours[request]
        same = theirs[BatchRequest(2, request.number, global_positions(ours, request))]
        for name, values in same["user"].items():  # type: ignore[union-attr]
            assert torch.equal(mine["user"][name], values), name  # type: ignore[index]
        for key in ("item_rows", "weights", "negative_rows"):
            assert torch.equal(mine[key], same[key]), key  # type: ignore[arg-type]
        for name, values in same["item"].items():  # type: ignore[union-attr]
            assert torch.equal(mine["item"][name], values), name  # type: ignore[index]
        compared += 1
    assert compared == len(sampler)


def test_a_group_takes_files_spread_over_the_sample_order(
    data: PreparedData, tmp_path: Path
) -> None:
    """Group g of n holds files g, g + n, ...: users from the whole user order."""
    stream = stream_of(data, tmp_path / "samples", -(-data.n_samples // 5))  # 5 files
    assert len(stream.shards.files) == 5
    assert streamed(data, stream, group_shards=2).groups == [[0, 3], [1, 4], [2]]
    assert streamed(data, stream, group_shards=5).groups == [[0, 1, 2, 3, 4]]
    batches = streamed(data, stream, group_shards=2)
    files = stream.shards.files
    np.testing.assert_array_equal(
        batches.group_samples(0),
        np.r_[files[0].first : files[0].first + files[0].rows, files[3].first : files[4].first],
    )


def test_an_epoch_covers_every_sample_once_seeded_by_seed_and_epoch(
    data: PreparedData, stream: SampleStream
) -> None:
    batches = streamed(data, stream, group_shards=3)

    def epoch(seed: int, number: int) -> list[np.ndarray]:
        sampler = batches.batch_sampler(batch_size=50, seed=seed)
        sampler.set_epoch(number)
        return [global_positions(batches, request) for request in sampler]

    first = epoch(1, 0)
    assert len(first) == len(batches.batch_sampler(50, 1))
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(data.n_samples))
    again = epoch(1, 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    for other in (epoch(1, 1), epoch(2, 0)):
        assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=False))


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_get_equal_disjoint_shares(
    data: PreparedData, stream: SampleStream, world_size: int
) -> None:
    batches = streamed(data, stream, group_shards=2)
    shares = []
    for rank in range(world_size):
        sampler = batches.batch_sampler(batch_size=16, seed=0, world_size=world_size, rank=rank)
        sampler.set_epoch(1)
        requests = list(sampler)
        assert len(requests) == len(sampler)
        shares.append(requests)
    sizes = [[len(r.positions) for r in requests] for requests in shares]
    assert all(s == sizes[0] for s in sizes)  # the same batches, so no process waits
    taken = [set(np.concatenate([global_positions(batches, r) for r in s])) for s in shares]
    for rank in range(1, world_size):
        assert not taken[0] & taken[rank]
    expected = sum(rows // world_size * world_size for rows in batches.group_rows)
    assert sum(len(t) for t in taken) == expected
    assert data.n_samples - expected < world_size * len(batches.groups)


def test_activity_weights_equal_those_of_the_samples_in_memory(
    data: PreparedData, stream: SampleStream
) -> None:
    starts = data.sample_histories.starts
    for power in (0.0, 0.5, 1.0):
        np.testing.assert_allclose(
            stream.stats.activity_weights(starts.astype(np.int64), power),
            user_activity_weights(starts, power),
            rtol=1e-6,
        )


def test_shards_that_skip_samples_are_refused_naming_the_file(
    data: PreparedData, tmp_path: Path
) -> None:
    directory = write_sample_shards(data, tmp_path / "samples")
    (directory / "part-00001.parquet").unlink()
    with pytest.raises(PreparedDataError, match=r"part-00002\.parquet: starts at sample 194"):
        SampleShards.open(str(directory))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreparedDataError, match="no Parquet sample shards"):
        SampleShards.open(str(tmp_path / "empty"))


def test_shards_are_taken_in_sample_order_whatever_their_names(
    data: PreparedData, tmp_path: Path
) -> None:
    directory = write_sample_shards(data, tmp_path / "samples")
    files = sorted(directory.iterdir())
    for number, path in enumerate(files):  # the names now sort in the reverse order
        path.rename(directory / f"part-{len(files) - number:06d}.parquet")
    opened = SampleShards.open(str(directory))
    assert [shard.first for shard in opened.files] == [
        n * ROWS_PER_SHARD for n in range(len(files))
    ]


def test_unreadable_shards_and_missing_columns_name_the_file(
    data: PreparedData, tmp_path: Path
) -> None:
    directory = write_sample_shards(data, tmp_path / "samples")
    columns = shards.sample_columns(data.encoders.user_input_names)
    assert SampleShards.open(str(directory), columns).n_samples == data.n_samples
    table = pq.read_table(directory / "part-00001.parquet").drop_columns([shards.HISTORY_END])
    pq.write_table(table, directory / "part-00001.parquet")
    with pytest.raises(
        PreparedDataError, match=r"part-00001\.parquet: no column \['history_end'\]"
    ):
        SampleShards.open(str(directory), columns)
    (directory / "part-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(PreparedDataError, match=r"part-00001\.parquet: cannot read"):
        SampleShards.open(str(directory), columns)


def test_streamed_data_refuses_the_in_memory_batches(data: PreparedData, stream) -> None:
    streamed_data = dataclasses.replace(data, sample_stream=stream)
    with pytest.raises(ValueError, match="stream from shards"):
        InteractionBatches.from_prepared(streamed_data)


def test_a_finished_fit_lets_the_group_go(data: PreparedData, stream: SampleStream) -> None:
    batches = streamed(data, stream)
    batches[next(iter(batches.batch_sampler(16, 0)))]
    assert batches._loaded is not None
    TwoTowerDataModule(batches).teardown("fit")
    assert batches._loaded is None


def test_item_rows_outside_the_catalogue_are_refused(data: PreparedData, tmp_path: Path) -> None:
    sample_shards = SampleShards.open(str(write_sample_shards(data, tmp_path / "samples")))
    with pytest.raises(PreparedDataError, match=r"part-00000\.parquet: item_row outside"):
        SampleStats.scan(sample_shards, n_items=1)


def test_a_sampler_needs_a_positive_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ShardEpochSampler([10], 0)
