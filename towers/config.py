"""Run configs as files: relative paths made absolute, so a run directory is
self-contained and ``twotower export RUN`` works from any directory."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# config keys that name files or folders
PATH_KEYS = (
    "data.path",
    "data.interactions",
    "data.items",
    "data.users",
    "data.prepared",
    "export.latest",
    "init_from",
    "paths.upload_to",
)


def absolute_paths(cfg: DictConfig, base: Path) -> None:
    """Make every relative path under :data:`PATH_KEYS` absolute against ``base`` (the
    directory the run was started in); URLs (``s3://...``) and absent keys are left."""
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str) or not value or "://" in value:
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            OmegaConf.update(cfg, key, str((base / path).resolve()), merge=False)


def run_directory_of(run_dir: Path) -> Path:
    """The directory a Hydra run was started in (``hydra.runtime.cwd`` of its
    ``.hydra/hydra.yaml``), or the current directory when that is not recorded."""
    record = run_dir / ".hydra" / "hydra.yaml"
    if record.is_file():
        cwd = OmegaConf.select(OmegaConf.load(record), "hydra.runtime.cwd", default=None)
        if cwd:
            return Path(str(cwd))
    return Path.cwd()
