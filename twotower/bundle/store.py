"""Reading and writing bundle directories: the one writer and the one reader.

:func:`write_bundle` is the only way a bundle is written (export, ``Retriever.save``,
the benchmarks): files go into a staging directory beside the target, the manifest is
completed with every file's sha256, permissions are made readable by other users
(directories 0755, files 0644), and only then is the directory renamed into place.
:func:`open_bundle` is the only way one is read: manifest validated, files verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from twotower.bundle import layout
from twotower.bundle.manifest import Manifest, check_inside
from twotower.errors import BundleError

log = logging.getLogger(__name__)
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
    """Delete the staging and retired directories a killed writer left beside ``target``
    (named ``.NAME-staging-PID-*`` / ``.NAME-old-PID``, PID no longer running)."""
    removed = []
    for prefix in (f".{target.name}-staging-", f".{target.name}-old-"):
        for path in target.parent.glob(f"{prefix}*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
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
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target``
    (an existing one is swapped out only once the new one is complete), on failure it is
    deleted, so nothing half-written is ever at ``target``. Staging directories left by a
    killed writer are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}-staging-{os.getpid()}-", dir=target.parent)
    )
    try:
        yield staging
        make_readable(staging)
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


def write_bundle(target: str | Path, write_files: Callable[[Path], Manifest]) -> Path:
    """Write a bundle atomically: ``write_files(staging)`` writes every file but the
    manifest and returns the :class:`Manifest`; the checksums are added here.

    Raises :class:`BundleError` when a required file is missing; then, as on any
    failure, nothing is left at ``target`` (an existing bundle there stays as it was).
    """
    target = Path(target).resolve()
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
