"""The typed bundle manifest, validated in one place.

``manifest.json`` is read with :meth:`Manifest.from_dict`, which checks every key and
its type, the format version, the metric and that every listed file stays inside the
bundle; writers build a :class:`Manifest` and never assemble the JSON by hand.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from twotower.bundle import layout
from twotower.errors import BundleError


def utc_now() -> str:
    """The current time as the manifest writes it (ISO 8601, UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class IndexInfo:
    """The FAISS index: factory string, size, default search knobs and measured recall."""

    factory: str
    ntotal: int
    search_params: dict[str, Any] = field(default_factory=dict)
    recall_k: int = 0
    ann_recall: float = 1.0
    recall_queries: int = 0


@dataclass(frozen=True)
class Counts:
    """How many items and users the bundle holds, and how many the model knows by id."""

    items: int
    users: int
    known_items: int = 0
    known_users: int = 0
    train_interactions: int = 0
    removed_items: int = 0


@dataclass(frozen=True)
class Manifest:
    """Everything ``manifest.json`` says about a bundle."""

    embedding_dim: int
    index: IndexInfo
    counts: Counts
    inputs: dict[str, list[str]]
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = layout.FORMAT_VERSION
    metric: str = layout.METRIC
    created_at: str = field(default_factory=utc_now)
    packages: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    onnx_parity_max_abs_diff: dict[str, float] = field(default_factory=dict)
    derived_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Manifest:
        """A copy with some fields changed (``counts``/``index`` as whole objects)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Any, source: str = layout.MANIFEST) -> Manifest:
        """Validate raw ``manifest.json`` data; a :class:`BundleError` names what is wrong."""
        if not isinstance(data, Mapping):
            raise BundleError(f"{source}: the manifest is a {type(data).__name__}, not an object")
        version = data.get("format_version")
        if version != layout.FORMAT_VERSION:
            raise BundleError(
                f"{source}: bundle format {version!r}, this runtime reads format "
                f"{layout.FORMAT_VERSION}; re-export the bundle with this version"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"{source}: unknown manifest key(s) {unknown}")
        for name in ("embedding_dim", "index", "counts", "inputs", "files"):
            if name not in data:
                raise BundleError(f"{source}: manifest has no '{name}'")
        if data.get("metric", layout.METRIC) != layout.METRIC:
            raise BundleError(
                f"{source}: metric {data['metric']!r}, expected {layout.METRIC!r}"
            )
        dim = _typed(data, "embedding_dim", int, source)
        if dim <= 0:
            raise BundleError(f"{source}: embedding_dim must be positive, got {dim}")
        inputs = _typed(data, "inputs", dict, source)
        for side in ("user", "item"):
            names = inputs.get(side)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise BundleError(f"{source}: inputs.{side} must be a list of input names")
        files = _typed(data, "files", dict, source)
        for name, digest in files.items():
            check_inside(name, source)
            if not isinstance(digest, str) or len(digest) != 64:
                raise BundleError(f"{source}: files['{name}'] is not a sha256 hex digest")
        return cls(
            embedding_dim=dim,
            index=_section(IndexInfo, data, "index", source),
            counts=_section(Counts, data, "counts", source),
            inputs={side: list(inputs[side]) for side in ("user", "item")},
            files=dict(files),
            format_version=int(version),
            metric=layout.METRIC,
            created_at=str(data.get("created_at", "")),
            packages=dict(_typed(data, "packages", dict, source, {})),
            metrics=dict(_typed(data, "metrics", dict, source, {})),
            config=dict(_typed(data, "config", dict, source, {})),
            export=dict(_typed(data, "export", dict, source, {})),
            onnx_parity_max_abs_diff=dict(
                _typed(data, "onnx_parity_max_abs_diff", dict, source, {})
            ),
            derived_from=data.get("derived_from"),
        )


def check_inside(name: str, source: str) -> None:
    """A manifest file name must be a plain name inside the bundle (no path, no ``..``)."""
    path = PurePosixPath(name)
    if (
        not name
        or path.is_absolute()
        or "\\" in name
        or len(path.parts) != 1
        or path.name in (".", "..")
    ):
        raise BundleError(f"{source}: file name {name!r} points outside the bundle")


_MISSING = object()


def _typed(
    data: Mapping[str, Any], key: str, kind: type, source: str, default: Any = _MISSING
) -> Any:
    value = data.get(key, default)
    if value is _MISSING:
        raise BundleError(f"{source}: manifest has no '{key}'")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BundleError(f"{source}: '{key}' must be an integer, got {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise BundleError(f"{source}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value


def _section(kind: type, data: Mapping[str, Any], key: str, source: str) -> Any:
    values = _typed(data, key, dict, source)
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise BundleError(f"{source}: unknown key(s) {unknown} in '{key}'")
    checked: dict[str, Any] = {}
    for name, spec in fields.items():
        if name not in values:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise BundleError(f"{source}: '{key}' has no '{name}'")
            continue
        value = values[name]
        expected = {"int": int, "float": (int, float), "str": str}.get(str(spec.type))
        if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise BundleError(f"{source}: '{key}.{name}' must be an integer, got {value!r}")
        if expected is not None and not isinstance(value, expected):
            raise BundleError(f"{source}: '{key}.{name}' has the wrong type: {value!r}")
        checked[name] = value
    if "search_params" in checked and not isinstance(checked["search_params"], dict):
        raise BundleError(f"{source}: '{key}.search_params' must be an object")
    return kind(**checked)
