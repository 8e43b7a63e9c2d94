"""``twotower prepare``: the prepared directory written on one machine without Spark
holds exactly what the single-machine path holds in memory (the same checks as
``twotower spark prepare``'s, in ``test_spark.py``), trains exactly as the tables do, and
fails on bad input with a message and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from towers.data.prepared_writer import run_local_prepare
from twotower.cli import main
from twotower.spark import shards
from twotower.spark.settings import PrepareSettings

from .conftest import TINY_OVERRIDES, compose_config
from .prepared_fixtures import (
    VARIANTS,
    assert_prepared_equals,
    assert_trains_as_the_tables,
    prepare_arguments,
    single_machine,
    synthetic_tables,
    variant_settings,
)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prepare_equals_the_single_machine_path(tmp_path: Path, name: str) -> None:
    variant = VARIANTS[name]
    tables = variant["tables"](tmp_path / "tables")
    data = single_machine(tables, variant)
    out = tmp_path / "prepared"
    result = run_local_prepare(variant_settings(tables, variant, out))
    assert_prepared_equals(out, result.manifest, data, name)
    assert json.loads((out / shards.MANIFEST).read_text()) == result.manifest
    assert result.manifest["writer"] == "twotower prepare"
    # whole users per file: about as many files as sample shards, never more
    assert (
        1
        <= len(list((out / shards.SPLIT).glob("*.parquet")))
        <= result.manifest["counts"]["shards"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "tables"]  # no staging


def reference_split(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """``split/`` as one table: the parts together in event order (user, time, item
    order), what :func:`write_split` writes a few users at a time."""
    from towers.data.split import item_order_key

    events = pd.concat(
        [p.assign(part=name) for p, name in zip(parts, ("fit", "validation", "test"), strict=True)],
        ignore_index=True,
    )
    events["user_id"] = events["user_id"].astype(str)
    events["item_id"] = events["item_id"].astype(str)
    order = np.lexsort((item_order_key(events["item_id"]), events["timestamp"], events["user_id"]))
    return events.take(order).reset_index(drop=True)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("n_shards", [1, 3, 50, 10_000])
def test_split_files_hold_the_events_in_order(tmp_path: Path, name: str, n_shards: int) -> None:
    """``split/`` holds every event of the three parts once, in event order across the
    parts, whole users per file, however many files are asked for (more than users too)."""
    from towers.data.prepared_writer import write_split

    variant = VARIANTS[name]
    split = single_machine(variant["tables"](tmp_path / "tables"), variant).split
    write_split(tmp_path / "split", split, n_shards)
    files = sorted((tmp_path / "split").glob("*.parquet"))
    assert 1 <= len(files) <= n_shards
    written = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    assert written[shards.EVENT].tolist() == list(range(len(written)))
    users_per_file = [set(pd.read_parquet(f, columns=["user_id"])["user_id"]) for f in files]
    assert sum(len(u) for u in users_per_file) == len(set().union(*users_per_file))
    expected = reference_split([split.fit, split.validation, split.test])
    for column in ("user_id", "item_id", "timestamp", "part"):
        assert written[column].tolist() == expected[column].tolist(), column


def test_sample_files_written_a_few_rows_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sample files built and written in row groups of any size hold exactly what the
    single-machine path holds; a part not in user order is refused by name."""
    import pyarrow.parquet as pq

    from towers.data import prepared_writer
    from towers.data.prepared_writer import write_split
    from towers.data.split import Split

    monkeypatch.setattr(prepared_writer, "ROWS_PER_GROUP", 97)
    variant = VARIANTS["temporal"]
    tables = variant["tables"](tmp_path / "tables")
    data = single_machine(tables, variant)
    out = tmp_path / "prepared"
    result = run_local_prepare(variant_settings(tables, variant, out))
    assert_prepared_equals(out, result.manifest, data, "temporal")
    first = sorted((out / shards.SAMPLES).glob("*.parquet"))[0]
    assert pq.ParquetFile(first).metadata.num_row_groups == -(-2000 // 97)

    split = data.split
    backwards = split.fit.iloc[::-1].reset_index(drop=True)
    with pytest.raises(ValueError, match="the fit part is not sorted by user"):
        write_split(
            tmp_path / "split",
            Split(split.train, backwards, split.validation, split.test, split.cold_items),
            2,
        )


def test_split_files_from_parts_with_other_ids(tmp_path: Path) -> None:
    """Parts whose id columns hold different ids (integers, "01" and "1" tying) are
    written in the same order as the parts together."""
    from towers.data.prepared_writer import write_split
    from towers.data.split import Split

    def part(users: list[str], items: list[str], times: list[float]) -> pd.DataFrame:
        return pd.DataFrame(
            {"user_id": pd.Categorical(users), "item_id": pd.Categorical(items), "timestamp": times}
        )

    fit = part(["1", "1", "2"], ["10", "9", "01"], [1.0, 1.0, 3.0])
    validation = part(["1", "3"], ["1", "2"], [1.0, 2.0])
    test = part(["2", "3", "3"], ["1", "02", "7"], [3.0, 5.0, 5.0])
    split = Split(fit.iloc[:0], fit, validation, test, np.array([], dtype=object))
    write_split(tmp_path / "split", split, 2)
    written = pd.concat(
        [pd.read_parquet(f) for f in sorted((tmp_path / "split").glob("*.parquet"))],
        ignore_index=True,
    )
    expected = reference_split([fit, validation, test])
    assert written["item_id"].tolist() == expected["item_id"].tolist()
    assert written["part"].tolist() == expected["part"].tolist()
    assert written["item_id"].tolist()[:4] == ["1", "9", "10", "01"]  # 1 ties with 01: file order
    empty = Split(fit.iloc[:0], fit.iloc[:0], validation.iloc[:0], test.iloc[:0], split.cold_items)
    write_split(tmp_path / "empty", empty, 3)  # no events: one empty file
    (only,) = (tmp_path / "empty").glob("*.parquet")
    assert pd.read_parquet(only).columns.tolist() == list(written.columns)
    assert len(pd.read_parquet(only)) == 0


def run_cli(*args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["prepare", *args])
    return code, out.getvalue(), err.getvalue()


def test_training_from_a_local_prepared_directory_equals_training_from_the_tables(
    tmp_path: Path,
) -> None:
    """``twotower prepare`` then ``data.prepared=DIR`` trains exactly as the tables
    themselves do; streamed (``data.stream=true``), the same samples in another order."""
    tables = synthetic_tables(tmp_path / "tables")
    prepared = tmp_path / "prepared"
    history = compose_config(TINY_OVERRIDES).features.history_length
    code, out, err = run_cli(*prepare_arguments(tables, prepared, history))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["output"] == str(prepared) and summary["shards"] > 1
    assert_trains_as_the_tables(tables, prepared, TINY_OVERRIDES, tmp_path)


def prepare_tables(tmp_path: Path, out: Path, **settings) -> None:
    tables = synthetic_tables(tmp_path / "tables")
    run_local_prepare(
        PrepareSettings(
            interactions=str(tables.interactions),
            items=str(tables.items),
            users=str(tables.users),
            output=str(out),
            samples_per_shard=2000,
            **settings,
        )
    )


def test_a_failure_while_writing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from towers.data import prepared_writer

    def broken(*args, **kwargs) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(prepared_writer, "write_split", broken)
    out = tmp_path / "prepared"
    with pytest.raises(OSError, match="disk full"):
        prepare_tables(tmp_path, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tables"]  # no output, no staging
    code, _, err = run_cli(
        "--interactions",
        str(tmp_path / "tables" / "events.parquet"),
        "--output",
        str(out),
    )
    assert code == 1 and "disk full" in err and not out.exists()
    assert run_cli("--interactions", "x", "--output", "y", "--log-level", "loud")[0] == 2


def test_split_files_out_of_order_or_with_an_unknown_part(tmp_path: Path) -> None:
    """``split/`` is put back in event order whatever its files' order; a part other
    than fit, validation and test is refused naming the directory."""
    import pyarrow.parquet as pq

    from towers.data.prepared_dir import load_prepared
    from towers.data.readers import load_user_table
    from twotower.errors import PreparedDataError

    out = tmp_path / "prepared"
    prepare_tables(tmp_path, out)
    users = load_user_table(tmp_path / "tables" / "users.parquet")
    expected = load_prepared(out, users).split
    files = sorted((out / shards.SPLIT).glob("*.parquet"))
    assert len(files) > 1
    for number, path in enumerate(files):  # the last events' file is now read first
        path.rename(path.with_name(f"z{len(files) - number:02d}.parquet"))
    found = load_prepared(out, users).split
    for part in ("train", "fit", "validation", "test"):
        pd.testing.assert_frame_equal(getattr(found, part), getattr(expected, part))
    first = sorted((out / shards.SPLIT).glob("*.parquet"))[0]
    table = pq.read_table(first).to_pandas()
    table.loc[0, shards.PART] = "holdout"
    table.to_parquet(first, index=False)
    with pytest.raises(PreparedDataError, match=r"split/ has unknown parts \['holdout'\]") as bad:
        load_prepared(out, users)
    assert f"data.prepared={out}" in str(bad.value)


def test_an_item_column_parquet_cannot_hold_is_named(tmp_path: Path) -> None:
    from towers.data.prepared_writer import write_catalogue
    from twotower.errors import DataValidationError

    catalogue = pd.DataFrame({"item_id": ["a", "b"], "studio": ["x", 1]})  # mixed types
    with pytest.raises(DataValidationError, match="the item table"):
        write_catalogue(tmp_path / "catalogue", catalogue)


def test_help_answers_without_torch_pandas_or_spark() -> None:
    import subprocess
    import sys

    probe = (
        "import sys; from twotower.cli import main; code = main(sys.argv[1:]); "
        "heavy = [m for m in ('pyspark', 'torch', 'pandas') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, "prepare", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--samples-per-shard" in result.stdout and "--master" not in result.stdout
