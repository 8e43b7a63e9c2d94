"""Bundles at fsspec URLs (``s3://``, ``gs://``, ...): publish a local bundle, fetch one.

Publishing uploads every file, then the manifest last, so a reader that finds the
manifest finds its files (a reader of a URL being overwritten can still see old files
under a new manifest: the checksums catch it, and versioned URLs avoid it).

Fetching downloads into a local cache keyed by the manifest's sha256, so a bundle is
downloaded once per version; the copy is verified against the manifest's checksums
(as every local bundle is on load) before it is used. A partial download never lands
in the cache: files go to a staging directory renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from twotower.bundle import layout
from twotower.bundle.manifest import Manifest, check_inside
from twotower.bundle.store import verify_files
from twotower.errors import BundleError
from twotower.storage import filesystem, upload_tree

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$TWOTOWER_CACHE_DIR``, else ``$XDG_CACHE_HOME/twotower``, else ``~/.cache/twotower``."""
    explicit = os.environ.get("TWOTOWER_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "twotower"


def publish_bundle(local: Path, url: str) -> str:
    """Upload the bundle directory ``local`` to ``url`` (files first, the manifest last,
    then any stale files of a bundle that was there removed). Returns ``url``."""
    upload_tree(local, url, last=layout.MANIFEST)
    log.info("bundle published to %s", url)
    return url


def fetch_bundle(url: str, cache: Path | None = None) -> Path:
    """A verified local copy of the bundle at ``url`` (downloaded unless already cached)."""
    fs, path = filesystem(url)
    root = path.rstrip("/")
    try:
        manifest_bytes = fs.cat_file(f"{root}/{layout.MANIFEST}")
    except FileNotFoundError as exc:
        raise BundleError(f"{url}: no bundle there (no {layout.MANIFEST})") from exc
    source = f"{url.rstrip('/')}/{layout.MANIFEST}"
    try:
        manifest = Manifest.from_dict(json.loads(manifest_bytes), source)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{source}: not a valid manifest: {exc}") from exc
    digest = hashlib.sha256(manifest_bytes).hexdigest()[:32]
    target = (cache or cache_root()) / "bundles" / digest
    if target.is_dir():
        try:
            verify_files(target, manifest)
            log.info("bundle %s: cached copy %s", url, target)
            return target
        except BundleError:
            log.warning("bundle %s: cached copy %s is damaged; downloading again", url, target)
            shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=target.parent))
    try:
        for name in manifest.files:
            check_inside(name, source)
            try:
                fs.get_file(f"{root}/{name}", str(staging / name))
            except FileNotFoundError as exc:
                raise BundleError(f"{url}/{name}: listed in the manifest but missing") from exc
        (staging / layout.MANIFEST).write_bytes(manifest_bytes)
        try:
            verify_files(staging, manifest)
        except BundleError as exc:
            raise BundleError(f"{url}: the downloaded bundle fails verification: {exc}") from exc
        try:
            staging.rename(target)
        except OSError:  # another process fetched the same version meanwhile
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("bundle %s downloaded to %s", url, target)
    return target
