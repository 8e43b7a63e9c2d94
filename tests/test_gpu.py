"""The CUDA training path (``trainer=gpu``); skipped where torch sees no GPU, as in CI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from retrieval import Retriever
from tests.conftest import TINY_OVERRIDES, compose_config
from towers.model.optim import SparseDenseAdam

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def _trained_steps(device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(50, 8, sparse=True), "lin": nn.Linear(8, 1)})
    model = model.to(device)
    optimizer = SparseDenseAdam(
        [
            {"params": list(model["lin"].parameters())},
            {"params": [model["emb"].weight], "sparse": True},
        ],
        lr=0.05,
    )
    ids = torch.tensor([[1, 3, 7], [3, 9, 11]], device=device)
    for _ in range(5):
        optimizer.zero_grad()
        model["lin"](model["emb"](ids)).square().mean().backward()
        optimizer.step()
    return [p.detach().cpu() for p in model.parameters()]


def test_sparse_dense_adam_on_cuda_matches_cpu() -> None:
    for on_gpu, on_cpu in zip(_trained_steps("cuda"), _trained_steps("cpu"), strict=True):
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)


def _train(tmp_path: Path, trainer: str, name: str):
    from towers.pipeline import train

    out = tmp_path / name
    overrides = [*TINY_OVERRIDES, f"trainer={trainer}", f"paths.output_dir={out}"]
    result = train(compose_config(overrides))
    assert result is not None
    return result


def test_gpu_run_learns_like_the_cpu_run_and_serves_without_torch_on_cpu(tmp_path: Path) -> None:
    gpu = _train(tmp_path, "gpu", "gpu")
    cpu = _train(tmp_path, "cpu", "cpu")
    for key in ("val/recall@20", "test/recall@20"):
        assert gpu.metrics[key] > gpu.metrics[key.replace("/", "_popularity/")]
        assert abs(gpu.metrics[key] - cpu.metrics[key]) < 0.05, key
    retriever = Retriever.load(gpu.bundle)
    user = str(gpu.data.test.user_ids[0])
    ids, scores = retriever.recommend(user_id=user, k=10)
    assert len(ids) == 10 and np.all(np.diff(scores) <= 1e-6)
