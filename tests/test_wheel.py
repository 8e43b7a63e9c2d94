"""The wheel, installed as a new user would, outside the checkout.

One fresh virtual environment (no system site packages, so nothing of the checkout can
leak in): first the base install, which must serve an existing bundle without torch;
then ``twotower[train]`` on top, which must train, export and serve from a directory
that is not the checkout (the Hydra configs come from inside the wheel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.serving import free_port
from towers.pipeline import TrainResult

from .conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.wheel]
INSTALL_TIMEOUT = 1200


def run(command: list[str], cwd: Path, timeout: int = INSTALL_TIMEOUT) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def serve_and_query(twotower: Path, bundle: Path, user: str, cwd: Path) -> dict:
    """Start ``twotower serve`` on the bundle, wait for /readyz, ask for one user's top 5."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = subprocess.Popen(
        [
            str(twotower),
            "serve",
            f"bundle={bundle}",
            f"port={port}",
            "log_level=warning",
            "auth=none",
        ],
        cwd=cwd,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                get_json(f"http://127.0.0.1:{port}/readyz")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    message = f"server did not start: {server.stderr.read()}"  # type: ignore[union-attr]
                    raise AssertionError(message) from None
                time.sleep(0.5)
        return get_json(f"http://127.0.0.1:{port}/recommend?user_id={user}&k=5")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the wheel, a fresh venv's bin directory), both outside the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work / "dist"),
            str(ROOT),
        ],
        cwd=work,
    )
    (wheel,) = (work / "dist").glob("twotower-*.whl")
    run([sys.executable, "-m", "venv", str(work / "venv")], cwd=work)
    yield wheel, work / "venv" / "bin"


def test_the_wheel_carries_the_configs_and_no_benchmarks(venv: tuple[Path, Path]) -> None:
    import zipfile

    wheel, _ = venv
    names = zipfile.ZipFile(wheel).namelist()
    assert "twotower/conf/train.yaml" in names and "twotower/conf/model/default.yaml" in names
    assert "twotower/py.typed" in names and "retrieval/server/app.py" in names
    assert not [n for n in names if n.startswith(("benchmarks/", "tests/", "scripts/"))]


def test_base_install_serves_a_bundle_without_torch(
    venv: tuple[Path, Path], trained: TrainResult, tmp_path: Path
) -> None:
    wheel, bin_dir = venv
    run([str(bin_dir / "pip"), "install", str(wheel)], cwd=tmp_path)
    probe = "import importlib.util as u; print(u.find_spec('torch') is None)"
    assert run([str(bin_dir / "python"), "-c", probe], cwd=tmp_path).strip() == "True"
    user = str(trained.data.test.user_ids[0])
    answer = serve_and_query(bin_dir / "twotower", trained.bundle, user, tmp_path)
    assert answer["user_id"] == user and len(answer["items"]) == 5
    assert answer["served_by"] == "model"


def test_train_extra_trains_exports_and_serves_outside_the_checkout(
    venv: tuple[Path, Path], tmp_path: Path
) -> None:
    wheel, bin_dir = venv
    pip = str(bin_dir / "pip")
    run([pip, "install", "torch==2.13.0"], cwd=tmp_path)
    run([pip, "install", f"{wheel}[train]"], cwd=tmp_path)
    twotower = str(bin_dir / "twotower")
    start = tmp_path / "project"
    start.mkdir()
    out = run(
        [
            twotower,
            "train",
            "experiment=quick",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "hydra.run.dir=runs/one",
        ],
        cwd=start,
    )
    assert "| test twotower |" in out and "sample recommendation for user" in out
    assert (start / "outputs" / "latest").is_symlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run(
        [
            twotower,
            "export",
            str(start / "runs" / "one"),
            "--ckpt",
            "last",
            "--out",
            str(elsewhere / "bundle"),
        ],
        cwd=elsewhere,
    )
    latest = os.readlink(start / "outputs" / "latest")
    assert latest.endswith(os.path.join("runs", "one", "bundle"))  # --out left it alone
    answer = serve_and_query(bin_dir / "twotower", elsewhere / "bundle", "u0", elsewhere)
    assert len(answer["items"]) == 5
