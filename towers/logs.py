"""Quieter training logs: Lightning's advertising tips and known deprecation noise from
its dependencies are dropped, so a redirected log holds what matters (the resolved config,
one line per epoch, the metrics)."""

from __future__ import annotations

import logging
import warnings

# loggers Lightning prints its info lines through
LIGHTNING_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
)
NOISE = (
    "Tip: For seamless",  # advertising for Lightning's cloud products
)


class DropNoise(logging.Filter):
    """Drops log records whose message contains one of :data:`NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in NOISE)


def quiet_lightning() -> None:
    """Install the filters (idempotent)."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise())
    # torch's pytree deprecation, raised inside Lightning, not by our code
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
