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
