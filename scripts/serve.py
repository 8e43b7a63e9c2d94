"""Serve a bundle over HTTP: ``python scripts/serve.py bundle=PATH [port=8000 workers=2]``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import hydra
import uvicorn
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from uvicorn.supervisors import Multiprocess

from retrieval import Retriever
from retrieval.server import tcp_listener
from retrieval.shared import ChangeFeed


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    bundle = Path(cfg.bundle).resolve()
    Retriever.load(bundle, device=cfg.device)  # fail here, with the reason, before forking workers
    os.environ["TWOTOWER_BUNDLE"] = str(bundle)
    os.environ["TWOTOWER_DEVICE"] = cfg.device
    workers = int(cfg.workers)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    state_file = cfg.state_file or (str(run_dir / "shared.sqlite") if workers > 1 else None)
    if state_file:
        # events, added items and reloads reach every worker through this file
        os.environ["TWOTOWER_STATE_FILE"] = str(Path(state_file).resolve())
        ChangeFeed(state_file).reset()
    if workers > 1:
        # /metrics sums every worker's series (prometheus-client's multiprocess mode)
        metrics_dir = run_dir / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # Several workers on few cores: one compute thread each, or their thread pools fight.
    threads = cfg.threads if cfg.threads is not None else (1 if workers > 1 else None)
    if threads is not None:
        os.environ["TWOTOWER_THREADS"] = str(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    config = uvicorn.Config(
        "retrieval.server:app_from_env",
        factory=True,
        host=cfg.host,
        port=int(cfg.port),
        workers=workers,
        log_level=cfg.log_level,
    )
    if workers == 1:
        uvicorn.Server(config).run()
    else:
        Multiprocess(config, sockets=[tcp_listener(cfg.host, int(cfg.port))]).run()


if __name__ == "__main__":
    main()
