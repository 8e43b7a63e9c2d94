"""A real Prometheus server scrapes the app on loopback and stores twotower_* series.

Needs Debian's `prometheus` binary (.ci/run installs it); skipped with the reason when
it is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from benchmarks.serving import free_port
from towers.pipeline import TrainResult

from .conftest import ROOT

pytestmark = pytest.mark.slow


TOKEN = "prometheus-scrape-token"


def write_scrape_config(path: Path, app_port: int, token: str, interval_s: float = 1) -> Path:
    """A Prometheus config scraping the app on ``app_port`` with a bearer token."""
    path.write_text(
        f"global:\n  scrape_interval: {interval_s}s\nscrape_configs:\n  - job_name: twotower\n"
        f"    authorization:\n      credentials: {token}\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{app_port}']\n"
    )
    return path


def start_prometheus(binary: str, config: Path, data: Path, port: int) -> subprocess.Popen:
    """Debian's prometheus server on loopback, storing its series under ``data``."""
    return subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def get(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


def wait_for(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def test_prometheus_scrapes_twotower_series(trained: TrainResult, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "Debian's prometheus is not installed (apt-get install prometheus; .ci/run does)"
        )
    app_port, prom_port = free_port(), free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "serve.py"),
            f"bundle={trained.bundle}",
            f"port={app_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TWOTOWER_API_TOKENS": f"{TOKEN}:read"},
    )
    config = write_scrape_config(tmp_path / "prometheus.yml", app_port, TOKEN)
    prometheus = None
    try:
        assert wait_for(lambda: "ok" in get(f"http://127.0.0.1:{app_port}/healthz"), 60), (
            "the app did not start"
        )
        user = trained.data.test.user_ids[0]
        get(f"http://127.0.0.1:{app_port}/recommend?user_id={user}&k=5", TOKEN)
        prometheus = start_prometheus(binary, config, tmp_path / "tsdb", prom_port)
        query = f"http://127.0.0.1:{prom_port}/api/v1/query?query=twotower_requests_total"

        def scraped() -> bool:
            result = json.loads(get(query))["data"]["result"]
            return any(r["metric"].get("route") == "/recommend" for r in result)

        assert wait_for(scraped, 60), "Prometheus stored no twotower_requests_total series"
        items = json.loads(
            get(f"http://127.0.0.1:{prom_port}/api/v1/query?query=twotower_index_items")
        )
        assert float(items["data"]["result"][0]["value"][1]) == len(trained.data.catalogue)
    finally:
        for process in (prometheus, server):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
