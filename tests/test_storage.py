"""Uploads of local directories (run directories, bundles) to URLs and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from twotower.storage import upload_tree


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "run"
    (src / "checkpoints" / "refit").mkdir(parents=True)
    (src / "checkpoints" / "refit" / "last.ckpt").write_bytes(b"weights")
    (src / "metrics.json").write_text("{}")
    return src


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_upload_to_a_local_folder_creates_nested_folders(
    source: Path, tmp_path: Path, scheme: str
) -> None:
    target = tmp_path / "uploads" / "r1"
    assert upload_tree(source, f"{scheme}{target}", last="metrics.json") == f"{scheme}{target}"
    assert tree(target) == {"checkpoints/refit/last.ckpt", "metrics.json"}
    assert (target / "checkpoints" / "refit" / "last.ckpt").read_bytes() == b"weights"


def test_a_second_upload_replaces_and_removes_stale_files(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "uploads"
    target.mkdir()
    (target / "old.txt").write_text("from an earlier run")
    upload_tree(source, str(target))
    assert tree(target) == {"checkpoints/refit/last.ckpt", "metrics.json"}


def test_an_overlapping_destination_is_refused_and_nothing_is_removed(source: Path) -> None:
    for destination in (source, source / "checkpoints", source.parent):
        with pytest.raises(ValueError, match="overlaps the directory uploaded"):
            upload_tree(source, str(destination))
    assert tree(source) == {"checkpoints/refit/last.ckpt", "metrics.json"}


def test_a_missing_last_file_is_named(source: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        upload_tree(source, str(tmp_path / "out"), last="manifest.json")
    assert not (tmp_path / "out").exists()


def test_a_bucket_root_is_refused(source: Path) -> None:
    pytest.importorskip("s3fs", reason="needs s3fs (the s3 extra)")
    with pytest.raises(ValueError, match="not its root"):
        upload_tree(source, "s3://some-bucket")
