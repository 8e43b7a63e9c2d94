"""The serving image: deploy/container/build.sh builds it, podman runs it on a bundle.

Needs root and podman (build.sh installs podman, runc and mmdebstrap with apt-get and
builds the Debian base image once; later runs reuse it and the cached layers). Skipped
with the reason when not root or when podman cannot be installed or used here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.serving import free_port
from towers.pipeline import TrainResult

from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.container]

log = logging.getLogger(__name__)

BUILD_SCRIPT = ROOT / "deploy" / "container" / "build.sh"
IMAGE = "localhost/twotower:latest"
BUILD_TIMEOUT = 1800
# build.sh's exit status when podman cannot be installed or does not work here
PODMAN_UNUSABLE = 3
TOKEN = "container-read-token"
APP_UID = 10001


def podman_environment() -> dict[str, str]:
    """The environment for podman: build.sh's containers.conf (runtime runc, ulimits)."""
    work = Path(os.environ.get("TWOTOWER_CONTAINER_DIR", "/var/cache/twotower-container"))
    return {**os.environ, "CONTAINERS_CONF": str(work / "containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``podman ARGS`` with build.sh's configuration; the finished process."""
    result = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=podman_environment(),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built by build.sh (skip when podman is unusable here)."""
    if os.geteuid() != 0:
        pytest.skip("the container test runs as root (rootful podman, apt-get, mmdebstrap)")
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        pytest.skip("podman is not installed and there is no apt-get to install it")
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        cwd=ROOT,
    )
    log.info("build.sh: status %d in %.0f s", result.returncode, time.monotonic() - started)
    if result.returncode == PODMAN_UNUSABLE:
        pytest.skip(f"podman cannot be installed or used here: {result.stderr[-1500:]}")
    assert result.returncode == 0, f"build.sh failed:\n{result.stderr[-5000:]}"
    return IMAGE


def request(url: str, token: str | None = None) -> tuple[int, Any]:
    """(status, decoded JSON body) of ``GET url``, with a bearer token when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def bundle_root(bundle: Path, root: Path) -> Path:
    """``root`` holding a copy of ``bundle`` as ``v1`` and a relative ``latest -> v1``,
    readable by the container's non-root user."""
    shutil.copytree(bundle, root / "v1")
    (root / "latest").symlink_to("v1")
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@pytest.fixture
def container(image: str, trained: TrainResult, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """(container name, base URL, state directory) of the image serving the tiny bundle;
    the container is removed after."""
    root = bundle_root(trained.bundle, tmp_path / "bundles")
    state = tmp_path / "state"
    state.mkdir()
    name = f"twotower-test-{uuid.uuid4().hex[:12]}"
    port = free_port()
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--publish",
        f"127.0.0.1:{port}:8000",
        "--volume",
        f"{root}:/bundles:ro",
        "--volume",
        f"{state}:/var/lib/twotower:U",  # :U chowns the directory to the image's user
        "--env",
        f"TWOTOWER_API_TOKENS={TOKEN}:read",
        "--read-only",
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        image,
        "log_level=warning",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if request(f"{url}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            running = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            if running != "true" or time.monotonic() > deadline:
                logs = podman("logs", name, check=False)
                raise AssertionError(f"the container did not serve:\n{logs.stderr[-3000:]}")
            time.sleep(0.5)
        yield name, url, state
    finally:
        logs = podman("logs", name, check=False)
        log.info("container log:\n%s%s", logs.stdout[-2000:], logs.stderr[-2000:])
        podman("rm", "--force", "--time", "5", name, check=False)


def test_the_image_serves_a_mounted_bundle_as_non_root(
    container: tuple[str, str, Path], trained: TrainResult
) -> None:
    from retrieval import Retriever

    name, url, state = container
    status, health = request(f"{url}/healthz")
    assert status == 200 and health["status"] == "ok"
    status, ready = request(f"{url}/readyz", TOKEN)  # only /healthz is open
    assert status == 200, ready
    assert ready["items"] == Retriever.load(trained.bundle).catalogue.live
    assert ready["bundle"] == "v1"
    user = str(trained.data.test.user_ids[0])
    status, answer = request(f"{url}/recommend?user_id={user}&k=5", TOKEN)
    assert status == 200, answer
    assert answer["user_id"] == user and len(answer["items"]) == 5
    status, _ = request(f"{url}/recommend?user_id={user}&k=5")
    assert status == 401
    assert podman("exec", name, "id", "-u").stdout.strip() == str(APP_UID)
    server_uid = podman("exec", name, "sh", "-c", "grep ^Uid: /proc/1/status").stdout.split()
    assert server_uid[1:] == [str(APP_UID)] * 4  # real, effective, saved, file system
    # the server keeps its state in the mounted directory, as the image's user
    assert {p.stat().st_uid for p in state.iterdir()} == {APP_UID}
