"""The Spark jobs (``twotower spark prepare|score``) against the single-machine code: the
same split, encoders and training samples, array by array; the same item vectors and
top-k lists as the bundle and ``Retriever.recommend_batch``; clear errors on bad input.

Spark runs in local mode (``local[2]``, 4 shuffle partitions, no UI, bound to 127.0.0.1);
the tests skip with the reason when pyspark or Java is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from towers.data.prepare import FeatureSettings
from towers.data.schema import ITEM_ID, USER_ID
from twotower.cli import main
from twotower.errors import PreparedDataError
from twotower.spark.session import spark_missing

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

MISSING = spark_missing()
needs_spark = pytest.mark.skipif(MISSING is not None, reason=f"Spark cannot run: {MISSING}")


@pytest.fixture(scope="module")
def spark():
    from twotower.spark.session import local_session

    session = local_session(2)
    yield session
    session.stop()


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.spark
@pytest.mark.slow
@needs_spark
def test_prepare_equals_the_single_machine_path(spark, tmp_path: Path, name: str) -> None:
    from twotower.spark.prepare import run_prepare

    variant = VARIANTS[name]
    tables = variant["tables"](tmp_path / "tables")
    data = single_machine(tables, variant)
    out = tmp_path / "prepared"
    result = run_prepare(spark, variant_settings(tables, variant, out))

    assert_prepared_equals(out, result.manifest, data, name)


@pytest.mark.spark
@pytest.mark.slow
@needs_spark
def test_local_prepare_writes_what_spark_prepare_writes(spark, tmp_path: Path) -> None:
    """``twotower prepare`` (no Spark) and ``twotower spark prepare`` write the same
    tables, column types included, and the same manifest but for who wrote it."""
    import pyarrow.parquet as pq

    from towers.data.prepared_writer import run_local_prepare
    from twotower.spark import shards
    from twotower.spark.prepare import PrepareSettings, run_prepare

    variant = VARIANTS["temporal"]
    tables = variant["tables"](tmp_path / "tables")
    outputs = {"local": tmp_path / "local", "spark": tmp_path / "spark"}
    manifests = {}
    for writer, out in outputs.items():
        settings = PrepareSettings(
            interactions=str(tables.interactions),
            items=str(tables.items),
            users=str(tables.users),
            output=str(out),
            features=FeatureSettings(**variant["features"]),
            samples_per_shard=2000,
        )
        job = run_local_prepare(settings) if writer == "local" else run_prepare(spark, settings)
        manifests[writer] = job.manifest
    local, theirs = manifests["local"], manifests["spark"]
    assert local.pop("writer") == "twotower prepare" and theirs.pop("spark")
    local.pop("twotower")
    assert local["settings"].pop("output") != theirs["settings"].pop("output")
    assert local == theirs
    for part, key in (
        (shards.SAMPLES, shards.SAMPLE),
        (shards.SPLIT, shards.EVENT),
        (shards.CATALOGUE, shards.ITEM_ROW),
    ):
        read = {writer: pq.read_table(out / part).sort_by(key) for writer, out in outputs.items()}
        ours, spark_table = read["local"], read["spark"]
        assert ours.schema.names == spark_table.schema.names, part
        for name in ours.schema.names:
            ours_type, spark_type = (
                ours.schema.field(name).type,
                spark_table.schema.field(name).type,
            )
            if hasattr(ours_type, "value_type"):  # lists: Spark names the element field
                ours_type, spark_type = ours_type.value_type, spark_type.value_type
            assert ours_type == spark_type, f"{part}.{name}: {ours_type} != {spark_type}"
        if part == shards.CATALOGUE:  # the item table's own columns, as each reads them
            assert ours.column(ITEM_ID).to_pylist() == spark_table.column(ITEM_ID).to_pylist()
            continue
        for name in ours.schema.names:
            assert ours.column(name).to_pylist() == spark_table.column(name).to_pylist(), name


@pytest.mark.spark
@pytest.mark.slow
@needs_spark
def test_file_order_spans_several_part_files(spark, tmp_path: Path) -> None:
    from twotower.spark.frames import ROW
    from twotower.spark.tables import read_table

    parts = tmp_path / "events"
    parts.mkdir()
    pd.DataFrame({"n": range(0, 50)}).to_parquet(parts / "part-0.parquet")
    pd.DataFrame({"n": range(50, 80)}).to_parquet(parts / "part-1.parquet")
    table = read_table(spark, str(parts)).orderBy(ROW).toPandas()
    assert table["n"].tolist() == list(range(80))
    assert table[ROW].tolist() == list(range(80))


@pytest.fixture(scope="module")
def scored(spark, trained, tmp_path_factory: pytest.TempPathFactory):
    """``twotower spark score`` over the tiny run's bundle: the bundle's catalogue and
    users, and a given item table (a new item among them) and user table (an unknown user
    among them)."""
    from retrieval import Retriever
    from twotower.bundle import layout
    from twotower.spark.score import ScoreSettings, run_score

    root = tmp_path_factory.mktemp("scored")
    retriever = Retriever.load(trained.bundle)
    items = pd.read_parquet(retriever.path / layout.ITEMS)
    items = items[[c for c in items.columns if not c.startswith(layout.RESERVED_PREFIX)]]
    items = pd.concat([items.head(30), items.head(1).assign(item_id="brand-new")])
    items.to_parquet(root / "items.parquet", index=False)
    user_ids = pd.read_parquet(retriever.path / layout.USERS)[USER_ID].head(40).tolist()
    pd.DataFrame({USER_ID: [*user_ids, "nobody"]}).to_csv(root / "users.csv", index=False)
    runs = {
        "bundle": run_score(spark, ScoreSettings(str(trained.bundle), str(root / "a"), k=10)),
        "given": run_score(
            spark,
            ScoreSettings(
                str(trained.bundle),
                str(root / "b"),
                items=str(root / "items.parquet"),
                users=str(root / "users.csv"),
                k=7,
                batch_size=8,
                ship_bundle=False,
            ),
        ),
    }
    return retriever, runs, items, [*user_ids, "nobody"]


def _assert_same_top_k(found: pd.DataFrame, retriever, user_ids: list[str], k: int) -> None:
    found = found.set_index(USER_ID).loc[user_ids]
    ids, scores = retriever.recommend_batch(user_ids=user_ids, k=k)
    for user, row_ids, row_scores, ours_ids, ours_scores in zip(
        user_ids, ids, scores, found["item_ids"], found["scores"], strict=True
    ):
        kept = [i for i in row_ids if i is not None]
        assert list(ours_ids) == kept, user
        np.testing.assert_allclose(ours_scores, row_scores[: len(kept)], atol=1e-5, err_msg=user)


@pytest.mark.spark
@pytest.mark.slow
@needs_spark
def test_score_top_k_equals_recommend_batch(scored) -> None:
    from twotower.bundle import layout

    retriever, runs, _, given_users = scored
    every_user = pd.read_parquet(retriever.path / layout.USERS)[USER_ID].tolist()
    found = pd.read_parquet(runs["bundle"].outputs["topk"])
    assert sorted(found[USER_ID]) == sorted(every_user)
    _assert_same_top_k(found, retriever, every_user, 10)
    assert set(found["served_by"]) == {"model"}
    given = pd.read_parquet(runs["given"].outputs["topk"])
    _assert_same_top_k(given, retriever, given_users, 7)
    assert given.set_index(USER_ID).loc["nobody", "served_by"] == "popularity"


@pytest.mark.spark
@pytest.mark.slow
@needs_spark
def test_score_item_vectors_equal_the_bundle_and_the_onnx_tower(scored) -> None:
    from twotower.bundle import layout
    from twotower.bundle.embeddings import read_embeddings
    from twotower.spark.score import read_vectors

    retriever, runs, items, _ = scored
    ids, vectors = read_vectors(runs["bundle"].outputs["items"])
    stored_ids, stored = read_embeddings(retriever.path / layout.ITEM_EMBEDDINGS)
    assert sorted(ids) == sorted(stored_ids)
    order = pd.Index(ids).get_indexer(stored_ids)
    np.testing.assert_allclose(vectors[order], stored, atol=1e-5)
    ids, vectors = read_vectors(runs["given"].outputs["items"])
    order = pd.Index(ids).get_indexer(items[ITEM_ID])
    np.testing.assert_allclose(vectors[order], retriever.embed_items(items), atol=1e-5)


def run_cli(*args: str) -> tuple[int, str]:
    """``twotower spark ARGS`` in this process (sharing the test's Spark session)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["spark", *args])
    return code, err.getvalue()


@pytest.mark.spark
@pytest.mark.slow
@needs_spark
def test_bad_input_fails_with_a_message_naming_it(spark, trained, tmp_path: Path) -> None:
    bundle = str(trained.bundle)
    out = str(tmp_path / "out")  # nothing is written there: every input is checked first
    code, err = run_cli("score", "--bundle", str(tmp_path / "nowhere"), "--output", out)
    assert code == 1 and "nowhere: no such bundle directory" in err
    code, err = run_cli("score", "--bundle", bundle, "--output", out, "--k", "0")
    assert code == 1 and "k must be a positive integer" in err
    users = tmp_path / "users.csv"
    pd.DataFrame({"customer": ["u1"]}).to_csv(users, index=False)
    code, err = run_cli("score", "--bundle", bundle, "--output", out, "--users", str(users))
    assert code == 1 and "users.csv: user table has no column 'user_id'" in err
    events = tmp_path / "events.parquet"
    pd.DataFrame({USER_ID: ["u1", None], ITEM_ID: ["i1", "i2"]}).to_parquet(events)
    code, err = run_cli("prepare", "--interactions", str(events), "--output", out)
    assert code == 1 and "events.parquet: column 'user_id' has a missing value at row 1" in err
    pd.DataFrame({USER_ID: ["u1"], "timestamp": [1.0]}).to_parquet(events)
    code, err = run_cli("prepare", "--interactions", str(events), "--output", out)
    assert code == 1 and "events.parquet: interactions table has no column 'item_id'" in err
    code, err = run_cli("prepare", "--interactions", str(tmp_path / "none.csv"), "--output", out)
    assert code == 1 and "none.csv: no such file or directory" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (tmp_path / "out" / "old").mkdir(parents=True)
    pd.DataFrame({USER_ID: ["u1"], ITEM_ID: ["i1"]}).to_parquet(events)
    code, err = run_cli("prepare", "--interactions", str(events), "--output", out)
    assert code == 1 and "exists and is not empty (use --overwrite)" in err
    assert run_cli("score", "--bundle", bundle)[0] == 2  # no --output: a usage error


@pytest.mark.parametrize("job", ["prepare", "score"])
def test_help_describes_the_job_without_spark_or_torch(job: str) -> None:
    probe = (
        "import sys; from twotower.cli import main; code = main(sys.argv[1:]); "
        "heavy = [m for m in ('pyspark', 'torch', 'onnxruntime') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, "spark", job, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"usage: twotower spark {job}" in result.stdout
    assert ("--interactions" if job == "prepare" else "--bundle") in result.stdout
    summary = json.dumps(result.stdout)  # the description names what the job writes
    assert ("samples/" if job == "prepare" else "item_vectors") in summary


@pytest.mark.spark
@pytest.mark.slow
@needs_spark
def test_cli_score_prints_a_summary(spark, trained, tmp_path: Path) -> None:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "spark",
                "score",
                "--bundle",
                str(trained.bundle),
                "--output",
                str(tmp_path),
                "--jobs",
                "items",
                "--bundle-shared",
            ]
        )
    assert code == 0
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    assert summary["rows"] == {
        "items": len(pd.read_parquet(Path(trained.bundle) / "items.parquet"))
    }
    assert (tmp_path / "item_vectors").is_dir() and not (tmp_path / "top_k").exists()


@pytest.mark.spark
@pytest.mark.slow
@needs_spark
def test_training_from_a_prepared_directory_equals_training_from_the_tables(
    spark, tmp_path: Path
) -> None:
    """``data.prepared=DIR`` (``twotower spark prepare``'s output) trains exactly as the
    tables themselves do: the same split, encoders and samples, so the same metrics."""
    from towers.pipeline import train

    tables = synthetic_tables(tmp_path / "tables")
    prepared = tmp_path / "prepared"
    history = compose_config(TINY_OVERRIDES).features.history_length
    code, err = run_cli("prepare", *prepare_arguments(tables, prepared, history))
    assert code == 0, err
    from_tables = assert_trains_as_the_tables(tables, prepared, TINY_OVERRIDES, tmp_path)
    common = [*TINY_OVERRIDES, "logger=none", "data=csv", f"data.users={tables.users}"]

    # what a prepared directory cannot serve fails before any work, naming the setting
    for override, message in (
        ("train.refit=true", "--fit-on train"),
        ("train.window_days=30", "train.window_days"),
    ):
        cfg = compose_config(
            [*common, f"data.prepared={prepared}", override, f"paths.output_dir={tmp_path}"]
        )
        with pytest.raises(PreparedDataError, match=message) as failure:
            train(cfg)
        assert f"data.prepared={prepared}" in str(failure.value)

    # the directory's encoders know user attributes: a run without the user table (or
    # with one lacking their columns) is refused rather than scoring unknown users
    from towers.data.prepared_dir import load_prepared

    with pytest.raises(PreparedDataError, match=r"set data\.users"):
        load_prepared(prepared, None)
    users = from_tables.data.users
    assert users is not None
    attributes = [c for c in users.columns if c != "user_id"]
    with pytest.raises(PreparedDataError, match="has no column"):
        load_prepared(prepared, users.drop(columns=attributes[:1]))


def test_training_from_a_directory_that_is_not_prepared_names_it(tmp_path: Path) -> None:
    from towers.pipeline import train

    directory = tmp_path / "not-prepared"
    (directory / "samples").mkdir(parents=True)
    (directory / "encoders.json").write_text("{}")
    base = [*TINY_OVERRIDES, "logger=none", f"paths.output_dir={tmp_path / 'run'}"]
    overrides = [*base, "data=csv"]
    with pytest.raises(PreparedDataError, match="not a prepared directory") as failure:
        train(compose_config([*overrides, f"data.prepared={directory}"]))
    assert f"data.prepared={directory}" in str(failure.value)
    (directory / "prepared.json").write_text(json.dumps({"format": 99, "trained_on": "fit"}))
    with pytest.raises(PreparedDataError, match="format 99") as failure:
        train(compose_config([*overrides, f"data.prepared={directory}"]))
    assert str(directory) in str(failure.value)
    with pytest.raises(PreparedDataError, match="needs data=csv"):
        train(compose_config([*base, f"data.prepared={directory}"]))  # data=synthetic
    with pytest.raises(PreparedDataError, match=r"set data\.prepared=DIR"):
        train(compose_config([*overrides, "data.stream=true"]))  # nothing to stream
