"""The settings of a prepare job (``twotower prepare``, ``twotower spark prepare``), and
what tells a local path from a URL; no Spark import, so that the local writer and the
command lines use them without pyspark."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from towers.data.prepare import FeatureSettings
from twotower.errors import MissingFileError

SAMPLES_PER_SHARD = 1_000_000


def is_local(path: str) -> bool:
    """Whether ``path`` is on the driver's file system (no URL scheme, or ``file:``)."""
    scheme = urlparse(path).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and path[1:3] in (":\\", ":/"))


def local_path(path: str) -> Path:
    """The file-system path of a local ``path`` (``file:`` URLs included)."""
    return Path(urlparse(path).path) if path.startswith("file:") else Path(path)


@dataclass
class PrepareSettings:
    """What ``twotower prepare`` and ``twotower spark prepare`` take: inputs, the split,
    the features, the output.

    The split and feature settings are those of ``conf/train.yaml`` (``split.*``,
    ``features.*``) with the same defaults."""

    interactions: str
    output: str
    items: str | None = None
    users: str | None = None
    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    unknown_items: str = "error"
    min_rating: float | None = None
    test_fraction: float = 0.2
    validation_fraction: float = 0.1
    min_interactions: int = 5
    cold_items: bool = False
    cold_fraction: float = 0.1
    seed: int = 42
    fit_on: str = "fit"
    features: FeatureSettings = field(default_factory=FeatureSettings)
    samples_per_shard: int = SAMPLES_PER_SHARD
    overwrite: bool = False

    def check(self) -> None:
        """A ``ValueError`` naming a setting out of range, or a missing local input."""
        if self.fit_on not in ("fit", "train"):
            raise ValueError(f"fit_on must be 'fit' or 'train', got {self.fit_on!r}")
        for name in ("test_fraction", "validation_fraction", "cold_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be within (0, 1), got {getattr(self, name)}")
        if self.min_interactions < 1 or self.samples_per_shard < 1:
            raise ValueError("min_interactions and samples_per_shard must be positive")
        if self.features.history_length < 0:
            raise ValueError("history_length must be >= 0")
        for table in (self.interactions, self.items, self.users):
            if table is not None and is_local(table) and not local_path(table).exists():
                raise MissingFileError(f"{table}: no such file or directory")


@dataclass
class PrepareResult:
    """Where a prepare job wrote, and what ``prepared.json`` says."""

    output: str
    manifest: dict[str, Any]


def settings_dict(settings: PrepareSettings) -> dict[str, Any]:
    """``settings`` as ``prepared.json`` records them (JSON types, without ``overwrite``)."""
    values = asdict(settings)
    values.pop("overwrite")
    return json.loads(json.dumps(values, default=str))
