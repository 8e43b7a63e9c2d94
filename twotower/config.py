"""Where the Hydra configs are: inside the installed wheel (``twotower/conf``, copied
from the checkout's top-level ``conf/`` at build time), or in the checkout itself."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The directory holding ``train.yaml`` and the config groups."""
    for candidate in (PACKAGE / "conf", PACKAGE.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"no Hydra configs found in {PACKAGE / 'conf'} or {PACKAGE.parent / 'conf'}; "
        "reinstall twotower"
    )
