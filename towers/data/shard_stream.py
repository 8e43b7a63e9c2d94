"""Training batches streamed from a prepared directory's sample shards, in bounded memory.

``twotower prepare`` and ``twotower spark prepare`` write the training samples as Parquet
shards in sample order (``samples/``, see ``docs/spark.md``). :class:`ShardBatches` trains
from them without holding them all: the shards are taken in groups of ``group_shards``
files spread over the sample order (with ``n`` groups, group ``g`` holds files ``g, g + n,
g + 2n, ...``: users from all over the user order, not one narrow range of them); each
epoch visits the groups in an order seeded by (seed, epoch) and each group's rows in
a permutation seeded by (seed, epoch, group), so an epoch's batches depend on nothing but
the seed and the epoch. Under DDP every process reads every group and takes an equal,
disjoint share of its rows (``rows // world_size`` each: at most ``world_size - 1`` rows of
a group sit out an epoch, a different few each epoch), so all processes run the same
number of batches. Only one group is in memory at a time, with the few item codes before
each of its files that its users' histories reach back to.

A batch is what :class:`towers.data.datamodule.InteractionBatches` makes of the same
samples in memory: the same user and item inputs, weights, histories (cut ``0..horizon-1``
events earlier, seeded by epoch and batch number) and mixed negatives (drawn from every
item trained on).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from towers.data.datamodule import Batch, BatchRequest, EpochBatchSampler, InteractionBatches
from towers.data.samples import HistorySource
from twotower.errors import PreparedDataError
from twotower.spark import shards
from twotower.storage import filesystem

log = logging.getLogger(__name__)

GROUP_SHARDS = 4


@dataclass(frozen=True)
class ShardFile:
    """One part file of ``samples/``: its path, row count and first sample."""

    path: str
    rows: int
    first: int


def _describe(fs: Any, path: str, columns: list[str]) -> ShardFile:
    """A part file's row count and first sample (from its footer and first row group),
    after checking that it holds ``columns``."""
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            missing = [name for name in columns if name not in parquet.schema_arrow.names]
            if missing:
                raise PreparedDataError(f"{path}: no column {missing} (see docs/spark.md)")
            rows = parquet.metadata.num_rows
            if rows == 0:
                return ShardFile(path, 0, 0)
            first = parquet.read_row_group(0, columns=[shards.SAMPLE]).column(0)[0].as_py()
    except (OSError, pa.ArrowException) as exc:
        raise PreparedDataError(f"{path}: cannot read as a Parquet sample shard ({exc})") from exc
    return ShardFile(path, rows, int(first))


class SampleShards:
    """The part files of a ``samples/`` directory (a path or a URL) in sample order.

    Opening reads only the Parquet footers and each file's first ``sample``; the files
    must hold consecutive samples 0, 1, ... (as both prepare jobs write them).
    """

    def __init__(self, location: str, files: list[ShardFile], fs: Any) -> None:
        self.location = location
        self.files = files
        self.fs = fs

    @classmethod
    def open(cls, samples_dir: str, columns: list[str] | None = None) -> SampleShards:
        """The shards under ``samples_dir``, each checked to hold ``columns`` (besides
        ``sample``): a :class:`PreparedDataError` naming the directory or the file when
        they are missing, unreadable, lack a column or do not hold consecutive samples."""
        fs, root = filesystem(str(samples_dir))
        try:
            names = [
                path
                for path in fs.find(root)
                if path.endswith(".parquet") and not path.rsplit("/", 1)[-1].startswith(("_", "."))
            ]
        except OSError as exc:
            raise PreparedDataError(
                f"{samples_dir}: cannot list the sample shards ({exc})"
            ) from exc
        if not names:
            raise PreparedDataError(f"{samples_dir}: no Parquet sample shards")
        needed = [shards.SAMPLE, *(columns or [])]
        found = [shard for shard in (_describe(fs, path, needed) for path in names) if shard.rows]
        found.sort(key=lambda shard: shard.first)  # part-100000 sorts before part-10001
        expected = 0
        for shard in found:
            if shard.first != expected:
                raise PreparedDataError(
                    f"{shard.path}: starts at sample {shard.first}, expected {expected}: the "
                    "shards of samples/ must hold consecutive samples (as `twotower prepare` "
                    "and `twotower spark prepare` write them)"
                )
            expected += shard.rows
        if not found:
            raise PreparedDataError(f"{samples_dir}: the sample shards hold no rows")
        return cls(str(samples_dir), found, fs)

    @property
    def n_samples(self) -> int:
        return self.files[-1].first + self.files[-1].rows

    def read(self, index: int, columns: list[str]) -> pa.Table:
        """Columns of file ``index``, in sample order."""
        shard = self.files[index]
        try:
            with self.fs.open(shard.path, "rb") as handle:
                table = pq.read_table(handle, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise PreparedDataError(f"{shard.path}: cannot read ({exc})") from exc
        if len(table) != shard.rows:
            raise PreparedDataError(
                f"{shard.path}: {len(table)} rows, its footer says {shard.rows}"
            )
        samples = table.column(shards.SAMPLE).to_numpy() if shards.SAMPLE in columns else None
        if samples is not None and not np.array_equal(
            samples, np.arange(shard.first, shard.first + shard.rows)
        ):
            raise PreparedDataError(
                f"{shard.path}: its rows are not samples {shard.first}.."
                f"{shard.first + shard.rows - 1} in order"
            )
        return table

    def item_codes(self, lo: int, hi: int) -> np.ndarray:
        """The ``item_code`` of samples ``lo..hi-1`` (reading that column only)."""
        parts = []
        for index, shard in enumerate(self.files):
            end = shard.first + shard.rows
            if end <= lo or shard.first >= hi:
                continue
            codes = self.read(index, [shards.ITEM_CODE]).column(0).to_numpy()
            parts.append(codes[max(lo - shard.first, 0) : hi - shard.first])
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class SampleStats:
    """What training needs of all the samples before the first batch, from one pass
    over two columns: each catalogue row's count of samples (the sampled-softmax
    correction and the mixed negatives' pool) and each user's count of samples (users
    told apart by ``history_start``; for ``train.user_weight_power``)."""

    item_counts: np.ndarray
    user_starts: np.ndarray  # sorted
    user_counts: np.ndarray

    @classmethod
    def scan(cls, sample_shards: SampleShards, n_items: int) -> SampleStats:
        """One pass over ``item_row`` and ``history_start``: a :class:`PreparedDataError`
        when an item row lies outside the catalogue of ``n_items``."""
        item_counts = np.zeros(n_items, dtype=np.int64)
        starts: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        for index, shard in enumerate(sample_shards.files):
            table = sample_shards.read(index, [shards.ITEM_ROW, shards.HISTORY_START])
            rows = table.column(shards.ITEM_ROW).to_numpy()
            if len(rows) and (rows.min() < 0 or rows.max() >= n_items):
                raise PreparedDataError(
                    f"{shard.path}: item_row outside the catalogue's {n_items} rows"
                )
            item_counts += np.bincount(rows, minlength=n_items)
            unique, count = np.unique(
                table.column(shards.HISTORY_START).to_numpy(), return_counts=True
            )
            starts.append(unique)
            counts.append(count)
        all_starts = np.concatenate(starts)
        user_starts, inverse = np.unique(all_starts, return_inverse=True)  # users span shards
        user_counts = np.bincount(inverse, weights=np.concatenate(counts)).astype(np.int64)
        return cls(item_counts, user_starts, user_counts)

    @property
    def n_samples(self) -> int:
        return int(self.item_counts.sum())

    def activity_weights(self, history_starts: np.ndarray, power: float) -> np.ndarray:
        """:func:`towers.data.samples.user_activity_weights` of the samples whose users
        start at ``history_starts``, scaled to mean 1 over all the samples."""
        if power == 0:
            return np.ones(len(history_starts), dtype=np.float32)
        counts = self.user_counts.astype(np.float64)
        mean = float((counts * counts**-power).sum() / counts.sum())
        mine = counts[np.searchsorted(self.user_starts, history_starts)]
        return (mine**-power / mean).astype(np.float32)


@dataclass(frozen=True)
class SampleStream:
    """Training samples left on disk: the shards and their :class:`SampleStats`."""

    shards: SampleShards
    stats: SampleStats

    @property
    def n_samples(self) -> int:
        return self.shards.n_samples


class ShardEpochSampler(EpochBatchSampler):
    """Batches of each group's rows: groups in a (seed, epoch)-seeded order, rows in a
    (seed, epoch, group)-seeded permutation, each process an equal, disjoint share."""

    def __init__(
        self,
        group_rows: list[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(sum(group_rows), batch_size, seed, shuffle, world_size, rank)
        self.group_rows = group_rows

    def __len__(self) -> int:
        share = (rows // self.world_size for rows in self.group_rows)
        return sum(-(-rows // self.batch_size) for rows in share)

    def __iter__(self) -> Iterator[BatchRequest]:
        number = 0
        for group in self.permutation(len(self.group_rows)):
            share = self.share(self.permutation(self.group_rows[group], int(group)))
            for lo in range(0, len(share), self.batch_size):
                yield BatchRequest(self.epoch, number, share[lo : lo + self.batch_size], int(group))
                number += 1


class ShardBatches(Dataset[Batch]):
    """Batches streamed from :class:`SampleShards`, one group of ``group_shards`` files
    in memory at a time (see the module's docstring)."""

    def __init__(
        self,
        stream: SampleStream,
        user_input_names: list[str],
        catalogue_inputs: dict[str, np.ndarray],
        history_length: int,
        mixed_negatives: int = 0,
        seed: int = 0,
        target_horizon: int = 1,
        user_weight_power: float = 0.0,
        group_shards: int = GROUP_SHARDS,
    ) -> None:
        if group_shards < 1:
            raise ValueError(f"group_shards must be >= 1, got {group_shards}")
        if target_horizon < 1:
            raise ValueError(f"target_horizon must be >= 1, got {target_horizon}")
        self.stream = stream
        self.user_input_names = user_input_names
        self.catalogue_inputs = catalogue_inputs
        self.history_length = history_length
        self.mixed_negatives = mixed_negatives
        self.seed = seed
        self.target_horizon = target_horizon
        self.user_weight_power = user_weight_power
        self.negative_pool = np.flatnonzero(stream.stats.item_counts)
        # the files of a group are spread over the sample order (files g, g + n, g + 2n,
        # ... of n groups): the samples are in user order, so consecutive files would put
        # a narrow range of users (perhaps one cohort) in every batch of a group
        n_files = len(stream.shards.files)
        n_groups = -(-n_files // group_shards)
        self.groups = [list(range(g, n_files, n_groups)) for g in range(n_groups)]
        self._loaded: tuple[int, InteractionBatches] | None = None

    def __len__(self) -> int:
        return self.stream.n_samples

    @property
    def group_rows(self) -> list[int]:
        files = self.stream.shards.files
        return [sum(files[index].rows for index in group) for group in self.groups]

    def batch_sampler(
        self, batch_size: int, seed: int, world_size: int = 1, rank: int = 0
    ) -> ShardEpochSampler:
        """This process's share of each epoch's batches, group by group."""
        return ShardEpochSampler(self.group_rows, batch_size, seed, True, world_size, rank)

    def release(self) -> None:
        """Let the group in memory go (training is over)."""
        self._loaded = None

    def group(self, number: int) -> InteractionBatches:
        """Group ``number``'s samples in memory (the last one asked for is kept)."""
        if self._loaded is None or self._loaded[0] != number:
            self._loaded = None  # let the previous group go before reading the next
            self._loaded = (number, self._read_group(number))
        return self._loaded[1]

    def group_samples(self, number: int) -> np.ndarray:
        """The samples of group ``number``, in the order of its rows (a request's
        ``positions`` index this)."""
        files = self.stream.shards.files
        return np.concatenate(
            [np.arange(files[i].first, files[i].first + files[i].rows) for i in self.groups[number]]
        )

    def _read_group(self, number: int) -> InteractionBatches:
        sample_shards = self.stream.shards
        columns = [shards.SAMPLE, *shards.sample_columns(self.user_input_names)]
        reach = self.history_length + self.target_horizon - 1
        tables, codes, starts, ends = [], [], [], []
        offset = 0  # each file's item codes follow the codes its histories reach back to
        for index in self.groups[number]:
            table = sample_shards.read(index, columns)
            first = sample_shards.files[index].first
            file_starts = table.column(shards.HISTORY_START).to_numpy().astype(np.int64)
            file_ends = table.column(shards.HISTORY_END).to_numpy().astype(np.int64)
            # the earliest sample a history here reaches back to, perhaps in earlier files
            lo = int(np.maximum(file_starts, file_ends - reach).min()) if len(table) else first
            lo = min(lo, first)
            segment = np.concatenate(
                [
                    sample_shards.item_codes(lo, first),
                    table.column(shards.ITEM_CODE).to_numpy().astype(np.int64),
                ]
            )
            tables.append(table)
            codes.append(segment)
            starts.append(file_starts - lo + offset)
            ends.append(file_ends - lo + offset)
            offset += len(segment)
        table = pa.concat_tables(tables)
        history_starts = table.column(shards.HISTORY_START).to_numpy().astype(np.int64)
        weights = table.column(shards.WEIGHT).to_numpy().astype(np.float32)
        weights = weights * self.stream.stats.activity_weights(
            history_starts, self.user_weight_power
        )
        log.debug("streaming group %d: files %s", number, self.groups[number])
        return InteractionBatches(
            shards.user_inputs_of_rows(table, self.user_input_names),
            table.column(shards.ITEM_ROW).to_numpy().astype(np.int64),
            self.catalogue_inputs,
            weights,
            self.mixed_negatives,
            self.seed,
            HistorySource(
                np.concatenate(codes),
                np.concatenate(starts),
                np.concatenate(ends),
                self.history_length,
            ),
            self.target_horizon,
            negative_pool=self.negative_pool,
        )

    def __getitem__(self, request: BatchRequest) -> Batch:  # type: ignore[override]
        return self.group(request.group)[request]
