"""S3 through fsspec against a real S3 API server on loopback (moto in server mode):
train from s3:// Parquet shards, export to s3://, load from s3:// (downloaded, verified,
cached) and serve it."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.serving import free_port, start_server
from tests.conftest import TINY_OVERRIDES, compose_config
from towers.data.synthetic import generate_synthetic
from twotower.bundle import layout
from twotower.errors import BundleError

pytestmark = pytest.mark.s3
moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
s3fs = pytest.importorskip("s3fs", reason="needs s3fs (the s3 extra)")
BUCKET = "twotower-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, with credentials and endpoint in the
    environment as any S3 client reads them, and an empty bucket."""
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        patch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    patch.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TWOTOWER_CACHE_DIR", str(cache))
    return cache


def upload_tables(prefix: str) -> None:
    """The tiny synthetic tables as s3:// Parquet: interactions in three shards."""
    fs = s3fs.S3FileSystem()
    raw = generate_synthetic(n_users=120, n_items=80, mean_events_per_user=15, seed=3)
    events = raw.interactions
    for part, rows in enumerate(np.array_split(np.arange(len(events)), 3)):
        with fs.open(f"{prefix}/interactions/part-{part}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pandas(events.iloc[rows], preserve_index=False), f)
    for name, table in (("items", raw.items), ("users", raw.users)):
        with fs.open(f"{prefix}/{name}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pandas(table, preserve_index=False), f)


@pytest.fixture(scope="module")
def s3_run(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory):
    """A tiny run trained on s3:// Parquet and exported to s3://."""
    from towers.pipeline import train

    data = f"s3://{BUCKET}/data"
    upload_tables(data)
    out = tmp_path_factory.mktemp("s3-run")
    overrides = [
        *TINY_OVERRIDES,
        "data=csv",
        f"data.interactions={data}/interactions",
        f"data.items={data}/items.parquet",
        f"data.users={data}/users.parquet",
        f"export.bundle_dir=s3://{BUCKET}/bundles/v1",
        f"paths.output_dir={out}",
        f"paths.upload_to=s3://{BUCKET}/runs/r1",
    ]
    result = train(compose_config(overrides))
    assert result is not None
    return result


def test_train_from_s3_and_export_to_s3(s3_run) -> None:
    from retrieval import Retriever

    assert s3_run.bundle == f"s3://{BUCKET}/bundles/v1"
    assert s3_run.data.info["train"] > 0
    fs = s3fs.S3FileSystem()
    names = {Path(p).name for p in fs.ls(f"{BUCKET}/bundles/v1")}
    assert {layout.MANIFEST, *layout.REQUIRED_FILES} <= names
    retriever = Retriever.load(s3_run.bundle)
    user = s3_run.data.test.user_ids[0]
    ids, scores = retriever.recommend(user_id=user, k=5)
    assert len(ids) == 5 and np.all(np.diff(scores) <= 1e-6)
    # the same answers as the model trained in this process, scored directly
    assert retriever.manifest.metrics["test/recall@20"] == s3_run.metrics["test/recall@20"]


def test_the_run_directory_is_uploaded(s3_run) -> None:
    fs = s3fs.S3FileSystem()
    root = f"{BUCKET}/runs/r1"
    uploaded = {p[len(root) + 1 :] for p in fs.find(root)}
    local = {p.relative_to(s3_run.output_dir).as_posix() for p in s3_run.output_dir.rglob("*")}
    assert {"metrics.json", "checkpoints/last.ckpt"} <= uploaded
    assert uploaded == {p for p in local if (s3_run.output_dir / p).is_file()}
    remote = json.loads(fs.cat_file(f"{root}/metrics.json"))
    assert remote["test/recall@20"] == s3_run.metrics["test/recall@20"]


def test_load_from_s3_downloads_once_into_the_cache(s3_run, own_cache: Path) -> None:
    from retrieval import Retriever

    first = Retriever.load(s3_run.bundle)
    cached = list((own_cache / "bundles").iterdir())
    assert len(cached) == 1 and Path(first.path) == cached[0].resolve()
    again = Retriever.load(s3_run.bundle)
    assert again.path == first.path and len(list((own_cache / "bundles").iterdir())) == 1


def test_a_corrupt_remote_bundle_is_refused_and_not_cached(s3_run, own_cache: Path) -> None:
    from retrieval import Retriever

    fs = s3fs.S3FileSystem()
    broken = f"{BUCKET}/bundles/broken"
    fs.copy(f"{BUCKET}/bundles/v1", broken, recursive=True)
    fs.pipe_file(f"{broken}/{layout.INDEX}", b"not an index")
    with pytest.raises(BundleError, match=r"s3://twotower-test/bundles/broken.*checksum"):
        Retriever.load(f"s3://{broken}")
    assert not any(p.name[0] != "." for p in (own_cache / "bundles").iterdir())
    with pytest.raises(BundleError, match=r"s3://twotower-test/bundles/none: no bundle"):
        Retriever.load(f"s3://{BUCKET}/bundles/none")


def test_serve_a_bundle_from_s3(s3_run, tmp_path: Path) -> None:
    from retrieval import Retriever

    process, port = start_server(s3_run.bundle, workers=1, run_dir=tmp_path)
    try:
        user = s3_run.data.test.user_ids[0]
        url = f"http://127.0.0.1:{port}/recommend?user_id={user}&k=3"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        expected = Retriever.load(s3_run.bundle).recommend(user_id=user, k=3)[0]
        assert [item["item_id"] for item in answer["items"]] == list(expected)
        assert answer["served_by"] == "model"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_missing_s3_data_names_the_url(s3_endpoint: str) -> None:
    from towers.data.readers import load_tables
    from twotower.errors import MissingFileError

    with pytest.raises(MissingFileError, match=f"s3://{BUCKET}/nothing"):
        load_tables(f"s3://{BUCKET}/nothing")


def test_training_streams_sample_shards_from_s3(s3_endpoint: str, tmp_path: Path) -> None:
    """``data.stream`` reads a prepared directory's ``samples/`` where it is: shards at an
    s3:// URL give the same batches as the samples in memory."""
    from tests.test_shard_stream import global_positions, write_sample_shards
    from towers.data.datamodule import BatchRequest, InteractionBatches
    from towers.data.prepare import FeatureSettings, prepare_data
    from towers.data.shard_stream import SampleShards, SampleStats, SampleStream, ShardBatches
    from towers.data.split import make_split, prepare_interactions
    from twotower.spark import shards
    from twotower.storage import upload_tree

    raw = generate_synthetic(n_users=120, n_items=80, mean_events_per_user=15, seed=3)
    data = prepare_data(
        raw, make_split(prepare_interactions(raw.interactions)), FeatureSettings(history_length=6)
    )
    url = upload_tree(write_sample_shards(data, tmp_path / "samples"), f"s3://{BUCKET}/samples")
    sample_shards = SampleShards.open(url, shards.sample_columns(data.encoders.user_input_names))
    assert sample_shards.n_samples == data.n_samples and len(sample_shards.files) > 2
    stream = SampleStream(sample_shards, SampleStats.scan(sample_shards, data.n_items))
    names = data.encoders.user_input_names
    ours = ShardBatches(stream, names, data.catalogue_inputs, 6, target_horizon=3, group_shards=2)
    theirs = InteractionBatches.from_prepared(data, target_horizon=3)
    for request in ours.batch_sampler(batch_size=64, seed=0):
        mine = ours[request]
        same = theirs[BatchRequest(0, request.number, global_positions(ours, request))]
        assert torch.equal(mine["item_rows"], same["item_rows"])
        assert torch.equal(mine["user"]["history"], same["user"]["history"])


def test_prepare_reads_and_writes_s3(s3_endpoint: str, tmp_path: Path) -> None:
    """``twotower prepare`` from s3:// tables to an s3:// prepared directory (uploaded,
    ``prepared.json`` last), which a run then loads and streams from where it is; an
    occupied s3:// output is refused."""
    from towers.data.prepared_dir import load_prepared
    from towers.data.readers import load_tables, load_user_table
    from twotower.cli import main

    prefix = f"s3://{BUCKET}/prepare-tables"
    upload_tables(prefix)
    out = f"s3://{BUCKET}/prepared/v1"
    tables = [
        f"--interactions={prefix}/interactions",
        f"--items={prefix}/items.parquet",
        f"--users={prefix}/users.parquet",
        f"--output={out}",
        "--samples-per-shard=300",
    ]
    assert main(["prepare", *tables]) == 0
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{out}/prepared.json") and len(fs.ls(f"{out}/samples")) > 1
    users = load_user_table(f"{prefix}/users.parquet")
    data = load_prepared(out, users, stream=True)
    raw = load_tables(f"{prefix}/interactions", f"{prefix}/items.parquet")
    assert data.sample_stream is not None
    assert data.n_samples == data.split.stats()["fit"] and data.n_items == len(raw.items)
    assert main(["prepare", *tables]) == 1  # occupied: refused, left as it was
    assert fs.exists(f"{out}/prepared.json")
