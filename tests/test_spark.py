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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from towers.data.prepare import FeatureSettings, PreparedData, prepare_data
from towers.data.readers import load_tables
from towers.data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT
from towers.data.split import make_split, prepare_interactions
from towers.data.synthetic import generate_synthetic
from twotower.cli import main
from twotower.errors import PreparedDataError
from twotower.spark.session import spark_missing

from .conftest import TINY_OVERRIDES, compose_config

MISSING = spark_missing()
needs_spark = pytest.mark.skipif(MISSING is not None, reason=f"Spark cannot run: {MISSING}")


@pytest.fixture(scope="module")
def spark():
    from twotower.spark.session import local_session

    session = local_session(2)
    yield session
    session.stop()


@dataclass
class Tables:
    interactions: Path
    items: Path | None
    users: Path | None


def synthetic_tables(root: Path) -> Tables:
    """The built-in synthetic data as Parquet, with what exercises every rule: weights and
    ratings, repeated (user, item) pairs (later, and at the same time: file order decides),
    two items at one time (history ties) and a free-text item column."""
    raw = generate_synthetic(n_users=300, n_items=200, seed=1)
    rng = np.random.default_rng(0)
    events = raw.interactions.copy()
    events[WEIGHT] = rng.uniform(0.5, 2.0, len(events)).round(3)
    events["rating"] = rng.integers(1, 6, len(events))
    later = events.sample(200, random_state=0).assign(timestamp=lambda t: t[TIMESTAMP] + 5)
    same_time = events.sample(50, random_state=1).assign(weight=9.0)
    other_item = events.sample(40, random_state=2).assign(
        item_id=lambda t: [f"i{i}" for i in rng.integers(0, 200, len(t))]
    )
    events = pd.concat([events, later, same_time, other_item], ignore_index=True)
    items = raw.items.assign(
        title=[f"the {c} film number {i}" for i, c in enumerate(raw.items["category"])]
    )
    root.mkdir(parents=True, exist_ok=True)
    paths = Tables(root / "events.parquet", root / "items.parquet", root / "users.parquet")
    events.to_parquet(paths.interactions, index=False)
    items.to_parquet(paths.items, index=False)
    raw.users.to_parquet(paths.users, index=False)
    return paths


def csv_tables(root: Path) -> Tables:
    """Interactions only, as CSV with integer user and item ids (item ids then order ties as
    integers; the catalogue is the items in order of first appearance)."""
    raw = generate_synthetic(n_users=300, n_items=200, seed=2)
    events = raw.interactions.assign(
        user_id=raw.interactions[USER_ID].str[1:].astype(int),
        item_id=raw.interactions[ITEM_ID].str[1:].astype(int),
        rating=np.random.default_rng(1).integers(1, 6, len(raw.interactions)),
    )
    root.mkdir(parents=True, exist_ok=True)
    path = root / "events.csv"
    events.to_csv(path, index=False)
    return Tables(path, None, None)


VARIANTS: dict[str, dict[str, Any]] = {
    # Parquet, item and user tables with every attribute kind, the temporal split
    "temporal": {
        "tables": synthetic_tables,
        "split": {},
        "features": {"text_min_count": 2, "history_length": 8},
        "fit_on": "fit",
        "min_rating": None,
    },
    # CSV interactions only, a rating threshold, the cold-item split, the refit on train
    "cold": {
        "tables": csv_tables,
        "split": {"cold_items": True, "seed": 7},
        "features": {"id_min_count": 25, "history_length": 5},
        "fit_on": "train",
        "min_rating": 2.0,
    },
}


def single_machine(tables: Tables, variant: dict[str, Any]) -> PreparedData:
    raw = load_tables(tables.interactions, tables.items, tables.users)
    events = prepare_interactions(raw.interactions, variant["min_rating"])
    split = make_split(events, **variant["split"])
    return prepare_data(raw, split, FeatureSettings(**variant["features"]), variant["fit_on"])


def assert_same_encoders(ours: dict[str, Any], theirs: dict[str, Any], path: str = "") -> None:
    """Equal, but the numeric columns' mean and std within floating-point summation order."""
    assert ours.keys() == theirs.keys(), path
    for key, value in theirs.items():
        where = f"{path}.{key}"
        if isinstance(value, dict):
            assert_same_encoders(ours[key], value, where)
        elif isinstance(value, float):
            assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-15), where
        else:
            assert ours[key] == value, where


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.spark
@pytest.mark.slow
@needs_spark
def test_prepare_equals_the_single_machine_path(spark, tmp_path: Path, name: str) -> None:
    from twotower.spark import shards
    from twotower.spark.prepare import PrepareSettings, run_prepare

    variant = VARIANTS[name]
    tables = variant["tables"](tmp_path / "tables")
    data = single_machine(tables, variant)
    out = tmp_path / "prepared"
    result = run_prepare(
        spark,
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
        ),
    )

    # the split: every part, row by row, in order
    split = pd.read_parquet(out / shards.SPLIT).sort_values(shards.EVENT)
    assert split[shards.EVENT].tolist() == list(range(len(split)))
    for part in ("fit", "validation", "test"):
        ours = split.loc[split[shards.PART] == part].reset_index(drop=True)
        theirs = getattr(data.split, part).reset_index(drop=True)
        for column in (USER_ID, ITEM_ID, TIMESTAMP, WEIGHT):
            if column in theirs.columns:
                np.testing.assert_array_equal(
                    ours[column].to_numpy(), theirs[column].to_numpy(), err_msg=f"{part}.{column}"
                )
        assert len(ours) == len(theirs)
    stats = data.split.stats()
    assert {k: result.manifest["counts"][k] for k in stats} == stats
    assert result.manifest["cold_items"] == [str(i) for i in data.split.cold_items]

    # the encoders, in the bundle's format
    encoders = shards.read_encoders(out)
    assert_same_encoders(encoders.to_dict(), data.encoders.to_dict())
    assert encoders.items.ids.values == data.encoders.items.ids.values
    assert encoders.users.ids.values == data.encoders.users.ids.values

    # the catalogue
    catalogue = pd.read_parquet(out / shards.CATALOGUE).sort_values(shards.ITEM_ROW)
    assert catalogue[shards.ITEM_ROW].tolist() == list(range(len(data.catalogue)))
    assert catalogue[ITEM_ID].tolist() == data.catalogue[ITEM_ID].tolist()

    # the training samples, array by array
    assert len(list((out / shards.SAMPLES).glob("*.parquet"))) > 1
    samples = shards.read_samples(out)
    per_sample = data.user_inputs_of_samples()
    assert samples.user_inputs.keys() == per_sample.keys()
    for input_name, theirs in per_sample.items():
        ours = samples.user_inputs[input_name]
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, input_name
        if input_name == "user_num":
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, err_msg=input_name)
        else:
            np.testing.assert_array_equal(ours, theirs, err_msg=input_name)
    np.testing.assert_array_equal(samples.item_rows, data.sample_item_rows)
    np.testing.assert_array_equal(samples.weights, data.sample_weights)
    ours_h, theirs_h = samples.histories, data.sample_histories
    np.testing.assert_array_equal(ours_h.item_codes, theirs_h.item_codes)
    np.testing.assert_array_equal(ours_h.starts, theirs_h.starts)
    np.testing.assert_array_equal(ours_h.ends, theirs_h.ends)
    assert ours_h.length == theirs_h.length
    # the materialised windows are the plain leakage-free histories (horizon 1)
    windows = pd.read_parquet(out / shards.SAMPLES, columns=[shards.SAMPLE, shards.HISTORY])
    windows = np.stack(windows.sort_values(shards.SAMPLE)[shards.HISTORY].to_numpy())
    everyone = np.arange(len(samples))
    expected = theirs_h.windows(everyone, 1, np.random.default_rng(0))
    np.testing.assert_array_equal(windows, expected)
    if name == "temporal":  # the variant really exercised ties, weights and every encoder
        assert (theirs_h.ends > theirs_h.starts).any()
        assert (np.diff(theirs_h.ends) == 0).any()
        assert set(data.user_inputs_of_samples()) == {"user_id", "user_cat", "user_num"}
        assert data.encoders.items.text["title"].known_words
        assert data.encoders.items.multi_hot["tags"].vocabulary.values
    else:
        assert len(data.split.cold_items) > 0
        assert (data.user_inputs_of_samples()["user_id"] == 1).any()  # out of vocabulary
        assert (data.sample_histories.item_codes == 1).any()


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
    assert tables.items is not None and tables.users is not None
    prepared = tmp_path / "prepared"
    history = compose_config(TINY_OVERRIDES).features.history_length
    code, err = run_cli(
        "prepare",
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
        "2000",  # several shards
    )
    assert code == 0, err
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
    assert from_prepared.data.users is not None  # the evaluation users' attributes
    assert "user_num" in from_prepared.data.test.user_inputs
    metrics = [k for k in from_tables.metrics if k.startswith(("val/", "test/"))]
    assert metrics
    assert {k: from_prepared.metrics[k] for k in metrics} == {
        k: from_tables.metrics[k] for k in metrics
    }

    # streamed from the shards (data.stream): the same samples, batched in another order,
    # so the same metrics up to that order's noise (seeds differ by about 0.005 here)
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
    assert len(streamed.data.sample_item_rows) == 0  # nothing but the shards holds them
    for key in ("val/recall@20", "val/ndcg@20", "test/recall@20", "test/ndcg@20"):
        assert streamed.metrics[key] == pytest.approx(from_prepared.metrics[key], abs=0.02), key

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
