"""The bundle's layout and its manifest: file names, format version, integrity checks.

Shared by the exporter (``towers.export``) and the loader (:class:`retrieval.Retriever`),
so the two agree on every name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retrieval.errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
USER_TOWER = "user_tower.onnx"
ITEM_TOWER = "item_tower.onnx"
INDEX = "items.faiss"
ITEMS = "items.parquet"
USERS = "users.parquet"
ENCODERS = "encoders.json"
ITEM_EMBEDDINGS = "item_embeddings.parquet"
USER_EMBEDDINGS = "user_embeddings.parquet"
METRIC = "inner_product"
COUNT_COLUMN = "_twotower_train_count"
HISTORY_COLUMN = "_twotower_history"
SEEN_COLUMN = "_twotower_seen"
REMOVED_COLUMN = "_twotower_removed"
REQUIRED_FILES = (USER_TOWER, ITEM_TOWER, INDEX, ITEMS, USERS, ENCODERS, ITEM_EMBEDDINGS)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: Path) -> dict[str, Any]:
    """Read ``manifest.json`` and check format version, metric and required fields."""
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory")
    path = bundle / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: missing; {bundle} is not a twotower bundle") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest: {exc}") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format {version!r}, this runtime reads format {FORMAT_VERSION}"
        )
    for key in ("embedding_dim", "metric", "counts", "files"):
        if key not in manifest:
            raise BundleError(f"{path}: manifest has no '{key}'")
    if manifest["metric"] != METRIC:
        raise BundleError(f"{path}: metric {manifest['metric']!r}, expected {METRIC!r}")
    return manifest


def verify_files(bundle: Path, manifest: dict[str, Any]) -> None:
    """Every required file present and every listed file matching its sha256."""
    files: dict[str, str] = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{bundle / MANIFEST}: lists no checksum for '{name}'")
    for name, expected in files.items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        actual = sha256_of(path)
        if actual != expected:
            raise BundleError(
                f"{path}: checksum mismatch (manifest {expected[:12]}…, file {actual[:12]}…); "
                "the bundle is corrupt or was modified"
            )


def file_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file in ``directory`` but the manifest."""
    return {p.name: sha256_of(p) for p in sorted(directory.iterdir()) if p.name != MANIFEST}


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target``
    (an existing one is swapped out only once the new one is complete), on failure it is
    deleted, so nothing half-written is ever at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            retired = target.with_name(f".{target.name}-old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_manifest(
    directory: Path, manifest: dict[str, Any], default: Callable[[Any], Any] = str
) -> None:
    """Add the files' checksums to ``manifest`` and write it into ``directory``."""
    manifest["files"] = file_checksums(directory)
    (directory / MANIFEST).write_text(
        json.dumps(manifest, indent=2, default=default), encoding="utf-8"
    )
