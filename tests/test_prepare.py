"""``twotower prepare``: the prepared directory written on one machine without Spark
holds exactly what the single-machine path holds in memory (the same checks as
``twotower spark prepare``'s, in ``test_spark.py``), trains exactly as the tables do, and
fails on bad input with a message and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from towers.data.prepare import FeatureSettings
from towers.data.prepared_writer import run_local_prepare
from towers.pipeline import train
from twotower.cli import main
from twotower.spark import shards
from twotower.spark.settings import PrepareSettings

from .conftest import TINY_OVERRIDES, compose_config
from .prepared_fixtures import VARIANTS, assert_prepared_equals, single_machine, synthetic_tables


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prepare_equals_the_single_machine_path(tmp_path: Path, name: str) -> None:
    variant = VARIANTS[name]
    tables = variant["tables"](tmp_path / "tables")
    data = single_machine(tables, variant)
    out = tmp_path / "prepared"
    result = run_local_prepare(
        PrepareSettings(
            interactions=str(tables.interactions),
            items=None if tables.items is None else str(tables.items),
            users=None if tables.users is None else str(tables.users),
            output=str(out),
            min_rating=variant["min_rating"],
            fit_on=variant["fit_on"],
            features=FeatureSettings(**variant["features"]),
            samples_per_shard=2000,  # several shards
            **variant["split"],
        )
    )
    assert_prepared_equals(out, result.manifest, data, name)
    assert json.loads((out / shards.MANIFEST).read_text()) == result.manifest
    assert result.manifest["writer"] == "twotower prepare"
    assert len(list((out / shards.SPLIT).glob("*.parquet"))) == result.manifest["counts"]["shards"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "tables"]  # no staging


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
    assert tables.items is not None and tables.users is not None
    prepared = tmp_path / "prepared"
    history = compose_config(TINY_OVERRIDES).features.history_length
    code, out, err = run_cli(
        "--interactions",
        str(tables.interactions),
        "--items",
        str(tables.items),
        "--users",
        str(tables.users),
        "--output",
        str(prepared),
        "--history-length",
        str(history),
        "--samples-per-shard",
        "2000",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["output"] == str(prepared) and summary["shards"] > 1
    common = [*TINY_OVERRIDES, "logger=none", "data=csv", f"data.users={tables.users}"]
    from_tables = train(
        compose_config(
            [
                *common,
                f"data.interactions={tables.interactions}",
                f"data.items={tables.items}",
                f"paths.output_dir={tmp_path / 'from_tables'}",
            ]
        )
    )
    from_prepared = train(
        compose_config(
            [*common, f"data.prepared={prepared}", f"paths.output_dir={tmp_path / 'prepared_run'}"]
        )
    )
    assert from_tables is not None and from_prepared is not None
    assert from_prepared.data.info == {**from_tables.data.info, "prepared": str(prepared)}
    metrics = [k for k in from_tables.metrics if k.startswith(("val/", "test/"))]
    assert metrics
    assert {k: from_prepared.metrics[k] for k in metrics} == {
        k: from_tables.metrics[k] for k in metrics
    }
    # the same samples in another order (two groups of shards per epoch: test_shard_stream
    # checks every batch tensor by tensor), so comparable metrics: at this tiny size (about
    # 5k samples, 6 epochs) the order alone moved recall and NDCG@20 by up to 0.045 in
    # two seeds (at 1M events by under 0.001: docs/benchmarks/streaming.md)
    streamed = train(
        compose_config(
            [
                *common,
                f"data.prepared={prepared}",
                "data.stream=true",
                "data.stream_group_shards=2",
                f"paths.output_dir={tmp_path / 'streamed_run'}",
            ]
        )
    )
    assert streamed is not None and streamed.data.sample_stream is not None
    assert streamed.data.n_samples == from_prepared.data.n_samples
    for key in ("val/recall@20", "val/ndcg@20", "test/recall@20", "test/ndcg@20"):
        assert streamed.metrics[key] == pytest.approx(from_prepared.metrics[key], abs=0.06), key


def test_bad_input_fails_naming_it_and_writes_nothing(tmp_path: Path) -> None:
    tables = synthetic_tables(tmp_path / "tables")
    events = pd.read_parquet(tables.interactions)
    broken = tmp_path / "tables" / "broken.parquet"
    events.drop(columns=["timestamp", "item_id"]).to_parquet(broken, index=False)
    out = tmp_path / "prepared"

    code, _, err = run_cli("--interactions", str(broken), "--output", str(out))
    assert code == 1
    assert str(broken) in err and "item_id" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tables"]  # no staging left

    code, _, err = run_cli("--interactions", str(tmp_path / "nowhere.csv"), "--output", str(out))
    assert code == 1 and "nowhere.csv" in err and not out.exists()

    code, _, err = run_cli(
        "--interactions", str(tables.interactions), "--output", str(out), "--test-fraction", "1.5"
    )
    assert code == 1 and "test_fraction" in err and not out.exists()

    # an occupied output is refused before any work, and left as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("--interactions", str(tables.interactions), "--output", str(out))
    assert code == 1 and str(out) in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite replaces it with a complete directory, the old file gone
    code, _, err = run_cli(
        "--interactions", str(tables.interactions), "--output", str(out), "--overwrite"
    )
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / shards.MANIFEST).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "tables"]

    assert run_cli("--help")[0] == 0
    assert run_cli("--interactions", "x", "--output", "y", "--format", "csv")[0] == 2


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
