"""``split/`` read a file at a time (:mod:`towers.data.split_shards`): the parts of the
single-machine split, row by row, with the ids as the single-machine tables encode them,
whatever the files' number, names and row order; a broken directory names the file."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towers.data.prepare import PreparedData
from towers.data.prepared_dir import read_catalogue, read_split
from towers.data.prepared_writer import run_local_prepare
from towers.data.schema import ITEM_ID, TIMESTAMP, USER_ID
from towers.data.split import Split
from twotower.errors import PreparedDataError
from twotower.spark import shards

from .prepared_fixtures import VARIANTS, single_machine, variant_settings

PARTS = ("train", "fit", "validation", "test")


def prepared(tmp_path: Path, name: str) -> tuple[Path, PreparedData]:
    variant = VARIANTS[name]
    tables = variant["tables"](tmp_path / "tables")
    out = tmp_path / "prepared"
    run_local_prepare(variant_settings(tables, variant, out))
    return out, single_machine(tables, variant)


def load_split(out: Path) -> Split:
    catalogue = read_catalogue(out, item_table=False, where="here")
    return read_split(out, catalogue, [], "here")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_parts_are_the_single_machine_split(tmp_path: Path, name: str) -> None:
    out, data = prepared(tmp_path, name)
    found = load_split(out)
    every_user = sorted({str(u) for p in (data.split.train, data.split.test) for u in p[USER_ID]})
    every_item = sorted({str(i) for p in (data.split.train, data.split.test) for i in p[ITEM_ID]})
    for part in PARTS:
        ours, theirs = getattr(found, part), getattr(data.split, part)
        assert list(ours.columns) == [USER_ID, ITEM_ID]  # no timestamp: nothing reads it
        assert TIMESTAMP in theirs.columns
        for column, categories in ((USER_ID, every_user), (ITEM_ID, every_item)):
            assert isinstance(ours[column].dtype, pd.CategoricalDtype), (part, column)
            # the categories of every part: the sorted ids of the whole split, one object
            assert list(ours[column].cat.categories) == categories
            assert ours[column].cat.categories is found.train[column].cat.categories
            assert ours[column].cat.codes.dtype == np.int32 or len(categories) < 2**15
            np.testing.assert_array_equal(
                ours[column].astype(str).to_numpy(), theirs[column].astype(str).to_numpy()
            )
    assert found.stats() == {**data.split.stats(), "cold_items": 0}


def rewrite_split(out: Path, pieces: int, shuffle_rows: bool) -> None:
    """``split/`` again as ``pieces`` files named against the event order, each file's rows
    shuffled when ``shuffle_rows``, one file empty, the part column a dictionary."""
    directory = out / shards.SPLIT
    table = pq.read_table(directory).sort_by(shards.EVENT)
    for path in directory.iterdir():
        path.unlink()
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, table.num_rows, pieces + 1).astype(int)
    for number, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        piece = table.slice(lo, hi - lo)
        if shuffle_rows:
            piece = piece.take(pa.array(rng.permutation(piece.num_rows)))
        part = piece.column(shards.PART).combine_chunks().dictionary_encode()
        piece = piece.set_column(piece.schema.get_field_index(shards.PART), shards.PART, part)
        pq.write_table(piece, directory / f"z{pieces - number:03d}.parquet")
    pq.write_table(table.slice(0, 0), directory / "empty.parquet")
    (directory / "_SUCCESS").write_text("")


def test_any_number_order_and_row_order_of_files_reads_the_same(tmp_path: Path) -> None:
    out, _ = prepared(tmp_path, "temporal")
    expected = load_split(out)
    rewrite_split(out, pieces=23, shuffle_rows=True)
    found = load_split(out)
    for part in PARTS:
        pd.testing.assert_frame_equal(getattr(found, part), getattr(expected, part))


def write_first_file(out: Path, change: Callable[[pd.DataFrame], None]) -> Path:
    first = min((out / shards.SPLIT).glob("*.parquet"))
    table = pq.read_table(first).to_pandas()
    change(table)
    table.to_parquet(first, index=False)
    return first


def test_a_broken_split_names_the_file_the_row_or_the_id(tmp_path: Path) -> None:
    out, _ = prepared(tmp_path, "temporal")

    def unknown_item(table: pd.DataFrame) -> None:
        table.loc[3, ITEM_ID] = "no-such-item"

    first = write_first_file(out, unknown_item)
    with pytest.raises(
        PreparedDataError, match=r"item_id \['no-such-item'\] not in catalogue/"
    ) as bad:
        load_split(out)
    assert f"here/split/{first.name}" in str(bad.value)

    out, _ = prepared(tmp_path / "missing", "temporal")

    def missing_user(table: pd.DataFrame) -> None:
        table.loc[5, USER_ID] = None

    first = write_first_file(out, missing_user)
    with pytest.raises(
        PreparedDataError, match="column 'user_id' has a missing value at row 5"
    ) as bad:
        load_split(out)
    assert first.name in str(bad.value)

    out, _ = prepared(tmp_path / "overlap", "temporal")

    def overlapping(table: pd.DataFrame) -> None:
        table[shards.EVENT] += 1  # the first file's events now run into the second's

    write_first_file(out, overlapping)
    with pytest.raises(PreparedDataError, match=r"split/ event is not 0\.\.n-1"):
        load_split(out)
