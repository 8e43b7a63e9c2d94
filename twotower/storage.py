"""Local paths and fsspec URLs (``s3://``, ``gs://``, ``file://``, ...) in one place.

Everything that reads or writes data, run outputs or bundles goes through these helpers,
so a URL works wherever a path does. Remote file systems come from fsspec and its
plug-ins (``s3fs`` for S3: the ``s3`` extra); their credentials and endpoints are theirs
(for S3: the usual ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for a non-AWS server).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and bool(_URL.match(location))


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of ``url`` and the path within it.

    Raises ImportError naming the package to install when the scheme's plug-in is missing.
    """
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a base dependency
        raise ImportError("URLs need fsspec: pip install fsspec") from exc
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        scheme = url.split("://", 1)[0]
        extra = " (pip install 'twotower[s3]')" if scheme in ("s3", "s3a") else ""
        raise ImportError(f"{url}: no file system for {scheme}://{extra}: {exc}") from exc
    return fs, path


def arrow_filesystem(url: str) -> tuple[Any, str]:
    """``url`` as a pyarrow file system (fsspec's, wrapped) and the path within it."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a URL or a path."""
    if is_url(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location, *parts))


def exists(location: str) -> bool:
    """Whether a file or directory exists at ``location`` (path or URL)."""
    if is_url(location):
        fs, path = filesystem(location)
        return bool(fs.exists(path))
    return Path(location).exists()


def download_tree(url: str, destination: Path) -> Path:
    """Copy the directory at ``url`` into ``destination`` (created); returns it."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{url}: no such directory")
    destination.mkdir(parents=True, exist_ok=True)
    root = path.rstrip("/")
    files = [f for f in fs.find(root) if not fs.isdir(f)]
    for remote in files:
        local = destination / remote[len(root) :].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(local))
    log.info("downloaded %d files from %s", len(files), url)
    return destination


def upload_tree(source: Path, url: str) -> str:
    """Copy the local directory ``source`` to ``url``, replacing what was there; returns
    ``url``. Object stores have no atomic directory switch: readers that must never see a
    half-written bundle load a versioned URL (each export writes a new one)."""
    fs, path = filesystem(url)
    root = path.rstrip("/")
    if fs.exists(root):
        fs.rm(root, recursive=True)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    for local in files:
        fs.put_file(str(local), f"{root}/{local.relative_to(source).as_posix()}")
    log.info("uploaded %d files to %s", len(files), url)
    return url


def local_staging(prefix: str = "twotower-") -> Path:
    """A fresh local temporary directory (the caller removes it with :func:`remove`)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove(path: Path) -> None:
    """Remove a local directory tree, ignoring one already gone."""
    shutil.rmtree(path, ignore_errors=True)
