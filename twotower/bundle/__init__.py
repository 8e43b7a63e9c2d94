"""The bundle format, owned here: layout names (:mod:`~twotower.bundle.layout`), the typed
manifest (:mod:`~twotower.bundle.manifest`), the one writer and the one reader
(:mod:`~twotower.bundle.store`), and the embeddings' Parquet files
(:mod:`~twotower.bundle.embeddings`)."""

from twotower.bundle.manifest import Counts, IndexInfo, Manifest
from twotower.bundle.store import open_bundle, read_manifest, verify_files, write_bundle

__all__ = [
    "Counts",
    "IndexInfo",
    "Manifest",
    "open_bundle",
    "read_manifest",
    "verify_files",
    "write_bundle",
]
