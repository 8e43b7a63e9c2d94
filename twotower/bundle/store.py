"""Reading and writing bundle directories: the one writer and the one reader.

:func:`write_bundle` is the only way a bundle is written (export, ``Retriever.save``,
the benchmarks): files go into a staging directory beside the target, the manifest is
completed with every file's sha256, permissions are made readable by other users
(directories 0755, files 0644), and only then does the directory become a version
``NAME@VERSION`` beside the target, with ``NAME`` a link switched to it atomically (the
three newest versions, and any a link beside them points at, are kept).
:func:`open_bundle` is the only way one is read: manifest validated, files verified.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from twotower.bundle import layout
from twotower.bundle.manifest import Manifest, check_inside
from twotower.errors import BundleError

log = logging.getLogger(__name__)
# bundle versions kept beside a bundle's name: the newest and the two before it
KEEP_VERSIONS = 3
DIRECTORY_MODE = 0o755
FILE_MODE = 0o644


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: Path) -> Manifest:
    """Read and validate ``manifest.json`` (see :meth:`Manifest.from_dict`)."""
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory")
    path = bundle / layout.MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: missing; {bundle} is not a twotower bundle") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest: {exc}") from exc
    return Manifest.from_dict(data, str(path))


def verify_files(bundle: Path, manifest: Manifest) -> None:
    """Every required file listed and present, every listed file matching its sha256."""
    for name in layout.REQUIRED_FILES:
        if name not in manifest.files:
            raise BundleError(f"{bundle / layout.MANIFEST}: lists no checksum for '{name}'")
    for name, expected in manifest.files.items():
        path = bundle / name
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        actual = sha256_of(path)
        if actual != expected:
            raise BundleError(
                f"{path}: checksum mismatch (manifest {expected[:12]}…, file {actual[:12]}…); "
                "the bundle is corrupt or was modified"
            )


def open_bundle(path: str | Path) -> tuple[Path, Manifest]:
    """The resolved bundle directory and its verified manifest."""
    bundle = Path(path).resolve()
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    return bundle, manifest


def file_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file in ``directory`` but the manifest."""
    checksums = {}
    for path in sorted(directory.iterdir()):
        if path.name == layout.MANIFEST:
            continue
        check_inside(path.name, str(directory))
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"{path}: a bundle holds plain files only")
        checksums[path.name] = sha256_of(path)
    return checksums


def make_readable(directory: Path) -> None:
    """Directories 0755 and files 0644 under ``directory``, so other users can serve it."""
    os.chmod(directory, DIRECTORY_MODE)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(Path(root) / name, DIRECTORY_MODE)
        for name in files:
            os.chmod(Path(root) / name, FILE_MODE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Delete what a killed writer left beside ``target``: staging directories, retired
    directories and new links (``.NAME-staging-PID-*``, ``.NAME-old-PID``,
    ``.NAME-link-PID``) of a PID no longer running."""
    removed = []
    for kind in ("staging", "old", "link"):
        prefix = f".{target.name}-{kind}-"
        for path in target.parent.glob(f"{glob.escape(prefix)}*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                if path.is_symlink() or not path.is_dir():
                    path.unlink(missing_ok=True)
                else:
                    shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    if removed:
        log.info(
            "removed %d stale staging director%s beside %s",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            target,
        )
    return removed


@contextmanager
def staged_directory(target: Path, keep: int = KEEP_VERSIONS) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it becomes a new version
    directory ``NAME@VERSION`` and ``target`` a relative link switched to it in one
    rename, so ``target`` is always a complete bundle, the old one or the new one (never
    missing, never half-written). The newest ``keep`` versions stay (for a rollback);
    on failure the staging directory is deleted. Staging directories left by a killed
    writer are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}-staging-{os.getpid()}-", dir=target.parent)
    )
    try:
        yield staging
        make_readable(staging)
        version = target.with_name(f"{target.name}@{version_stamp()}")
        os.replace(staging, version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    switch_link(target, version)
    prune_versions(target, keep)


def version_stamp() -> str:
    """A version name that sorts by time: UTC to the microsecond."""
    now = time.time()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"


def switch_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` (relatively) in one atomic step: a new link renamed
    over the old one. A real directory at ``link`` (a bundle written before versions) is
    exchanged with the new link atomically where the kernel can (``renameat2``) and
    kept as the version ``NAME@legacy``."""
    staging = link.with_name(f".{link.name}-link-{os.getpid()}")
    if staging.is_symlink() or staging.exists():
        staging.unlink()
    staging.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    if link.is_dir() and not link.is_symlink():
        legacy = link.with_name(f"{link.name}@legacy")
        shutil.rmtree(legacy, ignore_errors=True)
        if _exchange(staging, link):
            os.replace(staging, legacy)  # the old directory, now under the staging name
            return
        os.replace(link, legacy)
    os.replace(staging, link)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False when the
    system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    done = renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange)
    return done == 0


def versions_of(target: Path) -> list[Path]:
    """The version directories ``NAME@VERSION`` beside ``target``, oldest first (by the
    time their version was written)."""
    found = [p for p in target.parent.glob(f"{glob.escape(target.name)}@*") if p.is_dir()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def prune_versions(target: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` versions; never one that a link beside them
    points at (``NAME`` itself, ``latest``, a pinned name)."""
    linked = {
        p.resolve() for p in target.parent.iterdir() if p.is_symlink() and p.exists()
    }
    for old in versions_of(target)[: -keep or None]:
        if old.resolve() not in linked:
            shutil.rmtree(old, ignore_errors=True)


def write_bundle(target: str | Path, write_files: Callable[[Path], Manifest]) -> Path:
    """Write a bundle atomically: ``write_files(staging)`` writes every file but the
    manifest and returns the :class:`Manifest`; the checksums are added here.

    Raises :class:`BundleError` when a required file is missing; then, as on any
    failure, nothing is left at ``target`` (an existing bundle there stays as it was).
    """
    given = Path(os.path.abspath(target))
    target = given.parent.resolve() / given.name  # not the link's version: the link itself
    with staged_directory(target) as staging:
        manifest = write_files(staging)
        missing = [name for name in layout.REQUIRED_FILES if not (staging / name).is_file()]
        if missing:
            raise BundleError(f"{target}: the bundle writer left out {missing}")
        manifest = manifest.replace(files=file_checksums(staging))
        Manifest.from_dict(manifest.to_dict(), str(target / layout.MANIFEST))  # round-trips
        (staging / layout.MANIFEST).write_text(
            json.dumps(manifest.to_dict(), indent=2, default=str), encoding="utf-8"
        )
    log.info("bundle written to %s", target)
    return target
