"""Load test of the HTTP server on loopback with wrk (bounded duration and connections)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LUA = """math.randomseed(42)
request = function()
  return wrk.format("GET", "/recommend?user_id=u" .. math.random(0, {users} - 1) .. "&k=10")
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    bundle: Path, workers: int, run_dir: Path, token: str | None = None
) -> tuple[subprocess.Popen, int]:
    """``twotower serve`` on a free loopback port; with ``token`` access control is on (the
    token holds every scope), without it the server runs with ``auth=none``."""
    port = free_port()
    environment = dict(os.environ)
    if token is not None:
        environment["TWOTOWER_API_TOKENS"] = f"{token}:read+write+admin"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twotower",
            "serve",
            f"bundle={bundle}",
            f"port={port}",
            f"workers={workers}",
            "log_level=warning",
            f"state_dir={run_dir / 'state'}",
            "auth=tokens" if token is not None else "auth=none",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment,
    )
    deadline = time.monotonic() + 120
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    answered: set[int] = set()  # ready when every worker has answered /readyz
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/readyz", headers=headers)
            with urllib.request.urlopen(request, timeout=2) as response:
                answered.add(json.loads(response.read())["worker"])
            if len(answered) >= workers:
                return process, port
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("the server did not become ready")


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, p50/p99 latency and errors from ``wrk --latency`` output."""
    found = {
        m.group(1): _ms(m.group(2))
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.M)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),  # type: ignore[union-attr]
        "p50_ms": found.get("50"),
        "p99_ms": found.get("99"),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(map(int, socket_errors.groups())) if socket_errors else 0),
    }


def load_test(
    port: int, users: int, connections: int, seconds: int, workdir: Path, token: str | None = None
) -> dict[str, Any]:
    """wrk against ``GET /recommend`` (with ``Authorization: Bearer token`` when given)."""
    script = workdir / "recommend.lua"
    script.write_text(LUA.replace("{users}", str(users)))
    header = ["-H", f"Authorization: Bearer {token}"] if token is not None else []
    result = subprocess.run(
        [
            "wrk",
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            *header,
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    return parse_wrk(result.stdout)
