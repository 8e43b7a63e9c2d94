"""Serve a bundle over HTTP: ``python scripts/serve.py bundle=PATH [port=8000 workers=2]``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import hydra
import uvicorn
from omegaconf import DictConfig
from uvicorn.supervisors import Multiprocess

from retrieval import Retriever


def tcp_listener(host: str, port: int) -> socket.socket:
    """The listening socket for several workers, created with ``IPPROTO_TCP``.

    uvicorn's own ``Config.bind_socket`` leaves ``proto`` at 0, so asyncio never sets
    TCP_NODELAY on accepted connections and every keep-alive response waits ~40 ms for
    the peer's delayed ACK (uvicorn issue #3149); measured here as a 48 ms floor.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    bundle = Path(cfg.bundle).resolve()
    Retriever.load(bundle, device=cfg.device)  # fail here, with the reason, before forking workers
    os.environ["TWOTOWER_BUNDLE"] = str(bundle)
    os.environ["TWOTOWER_DEVICE"] = cfg.device
    workers = int(cfg.workers)
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
