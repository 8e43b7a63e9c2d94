"""Serve a bundle over HTTP: ``python scripts/serve.py bundle=PATH [port=8000 workers=2]``."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import uvicorn
from omegaconf import DictConfig

from retrieval import Retriever


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    bundle = Path(cfg.bundle).resolve()
    Retriever.load(bundle, device=cfg.device)  # fail here, with the reason, before forking workers
    os.environ["TWOTOWER_BUNDLE"] = str(bundle)
    os.environ["TWOTOWER_DEVICE"] = cfg.device
    # Several workers on few cores: one compute thread each, or their thread pools fight.
    threads = cfg.threads if cfg.threads is not None else (1 if int(cfg.workers) > 1 else None)
    if threads is not None:
        os.environ["TWOTOWER_THREADS"] = str(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    uvicorn.run(
        "retrieval.server:app_from_env",
        factory=True,
        host=cfg.host,
        port=int(cfg.port),
        workers=int(cfg.workers),
        log_level=cfg.log_level,
    )


if __name__ == "__main__":
    main()
