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


def upload_tree(source: Path, url: str, last: str | None = None) -> str:
    """Copy the local directory ``source`` to ``url`` (a URL or a path); returns ``url``.

    Every file is uploaded first (``last``, a name relative to ``source``, after all the
    others: a marker such as a bundle's manifest), then the files that were at ``url``
    before and are not in ``source`` are removed, so a failure midway leaves the new
    files beside the old ones, never an empty destination. A bucket's root and a
    destination overlapping ``source`` are refused. Object stores have no atomic
    directory switch: readers that must never see a mix load a versioned URL."""
    fs, path = filesystem(url)
    root = path.rstrip("/")
    check_destination(fs, root, source, url)
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    if last is not None:
        if last not in files:
            raise FileNotFoundError(f"{source / last}: no such file to upload last")
        files = [name for name in files if name != last] + [last]
    made: set[str] = set()
    for name in files:
        target = f"{root}/{name}"
        parent = target.rsplit("/", 1)[0]
        if parent not in made:
            fs.makedirs(parent, exist_ok=True)
            made.add(parent)
        fs.put_file(str(source / name), target)
    stale = [f for f in fs.find(root) if f[len(root) :].lstrip("/") not in set(files)]
    if stale:
        fs.rm(stale)
    log.info("uploaded %d files to %s (%d stale removed)", len(files), url, len(stale))
    return url


def check_upload_target(url: str, source: Path) -> None:
    """Fail early (before a long run) on an upload :func:`upload_tree` would refuse or
    could not reach: a missing file-system package, a bucket root, a destination
    overlapping ``source``, or an unreachable store (credentials, bucket, network)."""
    fs, path = filesystem(url)
    root = path.rstrip("/")
    check_destination(fs, root, source, url)
    try:
        fs.exists(root)
    except Exception as exc:  # each file system raises its own kinds
        raise OSError(f"{url}: cannot reach the upload destination ({exc})") from exc


def check_destination(fs: Any, root: str, source: Path, url: str) -> None:
    """Refuse an upload to a bucket's root (or an empty path) and one whose local
    destination is ``source``, inside it, or holds it."""
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if not root.strip("/") or (not local and "/" not in root.strip("/")):
        raise ValueError(f"{url}: upload to a folder inside the bucket, not its root")
    if local:
        destination, origin = Path(root).resolve(), source.resolve()
        if destination == origin or origin in destination.parents or destination in origin.parents:
            raise ValueError(f"{url}: the destination overlaps the directory uploaded ({source})")


def local_staging(prefix: str = "twotower-") -> Path:
    """A fresh local temporary directory (the caller removes it with :func:`remove`)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove(path: Path) -> None:
    """Remove a local directory tree, ignoring one already gone."""
    shutil.rmtree(path, ignore_errors=True)
