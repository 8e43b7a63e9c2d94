"""The bundle root: the one directory the server may load bundles from.

``POST /admin/reload {"bundle": NAME}`` names a bundle under it (``latest``, a version
directory, or a relative path such as ``2026-12-03/10-00-00/bundle``); the name may not
leave the root, by ``..``, an absolute path or a link pointing elsewhere, and hidden
entries (staging directories) are never loaded.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from twotower.errors import RequestError

MAX_NAME_LENGTH = 255


class BundleRoot:
    """Resolves bundle names under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def resolve(self, name: str) -> Path:
        """The directory ``name`` stands for; a :class:`RequestError` (which says nothing
        about the file system) when the name is not one of a bundle under the root."""
        refused = RequestError("bundle must be the name of a bundle under the bundle root")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise refused
        if "\\" in name or "\x00" in name:
            raise refused
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or any(
            part in ("", ".", "..") or part.startswith(".") for part in parts
        ):
            raise refused
        try:
            path = self.root.joinpath(*parts).resolve()
        except (OSError, RuntimeError):  # a link loop, an unreadable entry
            raise refused from None
        if path != self.root and self.root not in path.parents:
            raise refused
        inside = path.relative_to(self.root).parts
        if any(part.startswith(".") for part in inside):  # a link to a staging directory
            raise refused
        return path

    def name_of(self, path: str | Path) -> str:
        """``path`` as a name under the root (its last part when it lies elsewhere)."""
        resolved = Path(path).resolve()
        try:
            return resolved.relative_to(self.root).as_posix()
        except ValueError:
            return resolved.name
