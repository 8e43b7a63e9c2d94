"""A corrupt or mismatched bundle is refused with a message; bad requests are RequestErrors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retrieval import BundleError, RequestError, Retriever
from towers.pipeline import TrainResult
from twotower.bundle.layout import INDEX, MANIFEST, USER_TOWER


@pytest.fixture
def bundle_copy(trained: TrainResult, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(trained.bundle, target)
    return target


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_bad_k_is_a_request_error(trained: TrainResult, k: object) -> None:
    with pytest.raises(RequestError, match="k must be a positive integer"):
        Retriever.load(trained.bundle).recommend(history=[], k=k)  # type: ignore[arg-type]


def test_missing_bundle_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle"):
        Retriever.load(tmp_path / "absent")


def test_modified_file_fails_its_checksum(bundle_copy: Path) -> None:
    with (bundle_copy / USER_TOWER).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=r"user_tower\.onnx: checksum mismatch"):
        Retriever.load(bundle_copy)


def test_missing_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / INDEX).unlink()
    with pytest.raises(BundleError, match=r"items\.faiss: listed in the manifest but missing"):
        Retriever.load(bundle_copy)


def test_other_format_version_is_refused(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["format_version"] = 999
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bundle format 999"):
        Retriever.load(bundle_copy)


def test_dimension_mismatch_is_refused(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["embedding_dim"] += 1
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="index dim"):
        Retriever.load(bundle_copy)


def test_corrupt_manifest_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        Retriever.load(bundle_copy)
