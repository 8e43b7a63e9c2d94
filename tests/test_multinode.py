"""Multi-node training as a cluster runs it: two ``torchrun`` launchers on loopback, one per
"node", one process each (gloo), joined by Lightning's DDP (``trainer=ddp
trainer.num_nodes=2 trainer.devices=1``). The run must reach the same metrics as one
process with twice the per-process batch: the global batch is the same samples, and the
in-batch negatives are gathered across the nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.serving import free_port
from tests.conftest import TINY_OVERRIDES
from towers.pipeline import METRICS_FILE

pytestmark = [pytest.mark.multinode, pytest.mark.slow]
RUN = [*TINY_OVERRIDES, "trainer.max_epochs=2", "logger=none"]
COMPARED = ("val/recall@20", "val/ndcg@20", "test/recall@20", "test/ndcg@20", "test/recall@50")


def torchrun() -> list[str]:
    """torchrun as a module of this interpreter (the console script may be another's)."""
    return [sys.executable, "-m", "torch.distributed.run"]


def test_two_torchrun_nodes_match_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                *torchrun(),
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "twotower.cli.train",
                *RUN,
                "trainer=ddp",
                "trainer.devices=1",
                "trainer.num_nodes=2",
                f"hydra.run.dir={tmp_path / f'node{rank}'}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank}:\n{output[-3000:]}"
    assert "MEMBER: 2/2" in outputs[1]  # the second node joined as rank 1 of 2
    distributed = json.loads((tmp_path / "node0" / METRICS_FILE).read_text())
    assert not (tmp_path / "node1" / METRICS_FILE).exists()  # only rank 0 writes the run

    batch = 128  # the quick experiment's train.batch_size
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "twotower.cli.train",
            *RUN,
            f"train.batch_size={2 * batch}",
            f"hydra.run.dir={tmp_path / 'single'}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads((tmp_path / "single" / METRICS_FILE).read_text())
    for key in COMPARED:
        assert distributed[key] == pytest.approx(alone[key], abs=1e-6), key
