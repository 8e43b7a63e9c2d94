"""The bundle format's one owner: the typed manifest is validated in one place, files stay
inside the bundle, and bundles are written atomically and readable by other users."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from retrieval import Retriever
from towers.export.bundle import ExportSettings, export_bundle
from towers.pipeline import TrainResult
from twotower.bundle import Manifest, write_bundle
from twotower.bundle.layout import MANIFEST
from twotower.errors import BundleError


@pytest.fixture
def manifest_data(trained: TrainResult) -> dict:
    return json.loads((trained.bundle / MANIFEST).read_text())


def test_a_written_manifest_reads_back_equal(trained: TrainResult, manifest_data: dict) -> None:
    manifest = Manifest.from_dict(manifest_data)
    assert manifest.to_dict() == manifest_data
    assert manifest.index.ntotal == manifest.counts.items == len(trained.data.catalogue)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("counts"), "manifest has no 'counts'"),
        (lambda m: m.update(embedding_dim="64"), "'embedding_dim' must be an integer"),
        (lambda m: m.update(metric="l2"), "metric 'l2'"),
        (lambda m: m.update(surprise=1), r"unknown manifest key\(s\) \['surprise'\]"),
        (lambda m: m["index"].pop("factory"), "'index' has no 'factory'"),
        (lambda m: m["counts"].update(items=True), "'counts.items' must be an integer"),
        (lambda m: m["files"].update({"../secret": "0" * 64}), "points outside the bundle"),
        (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "points outside the bundle"),
        (lambda m: m["files"].update({"a/b": "0" * 64}), "points outside the bundle"),
        (lambda m: m["inputs"].update(user="history"), "inputs.user must be a list"),
    ],
)
def test_every_manifest_key_is_checked(manifest_data: dict, change, message: str) -> None:
    change(manifest_data)
    with pytest.raises(BundleError, match=message):
        Manifest.from_dict(manifest_data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json {", "unreadable manifest"),
        ("[1, 2]", "is a list, not an object"),
        ("{}", "format"),
    ],
)
def test_a_malformed_manifest_refuses_the_bundle(
    trained: TrainResult, tmp_path: Path, text: str, message: str
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(trained.bundle, bundle)
    (bundle / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match=message):
        Retriever.load(bundle)


def test_bundles_are_readable_by_other_users(trained: TrainResult) -> None:
    mode = stat.S_IMODE(trained.bundle.stat().st_mode)
    assert mode == 0o755
    for path in trained.bundle.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_the_writer_refuses_a_bundle_missing_a_file(tmp_path: Path, trained: TrainResult) -> None:
    manifest = Retriever.load(trained.bundle).manifest

    def write_nothing(staging: Path) -> Manifest:
        (staging / "items.parquet").write_bytes(b"")
        return manifest

    with pytest.raises(BundleError, match="left out"):
        write_bundle(tmp_path / "partial", write_nothing)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_latest_is_a_relative_link_that_moves_with_its_folder(
    trained: TrainResult, tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    settings = ExportSettings(latest=str(outputs / "latest"))
    export_bundle(trained.module, trained.data, outputs / "run1" / "bundle", settings=settings)
    link = outputs / "latest"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    moved = tmp_path / "moved"
    outputs.rename(moved)
    assert Retriever.load(moved / "latest").manifest.counts.items == len(trained.data.catalogue)


def test_staging_left_by_a_killed_export_is_removed_by_the_next(
    trained: TrainResult, tmp_path: Path
) -> None:
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = tmp_path / f".bundle-staging-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "items.faiss").write_bytes(b"half")
    retired = tmp_path / f".bundle-old-{dead.pid}"
    retired.mkdir()
    mine = tmp_path / f".bundle-staging-{os.getpid()}-live"  # a running writer's: kept
    mine.mkdir()
    export_bundle(trained.module, trained.data, tmp_path / "bundle")
    assert not stale.exists() and not retired.exists() and mine.exists()
    assert (tmp_path / "bundle" / MANIFEST).is_file()
