"""Towers to ONNX with a dynamic batch axis, and a parity check against torch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from towers.model.towers import PositionalTower
from twotower.errors import TwoTowerError

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-5


class ExportError(TwoTowerError):
    """Export produced something that does not match the trained model."""


def export_tower(
    tower: torch.nn.Module,
    input_names: list[str],
    sample: dict[str, np.ndarray],
    path: Path,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Write ``tower`` to ``path`` as ONNX; check it against torch on ``sample``.

    Returns the max absolute difference; raises :class:`ExportError` above ``tolerance``.
    """
    wrapper = PositionalTower(tower, input_names).eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[name])) for name in input_names)
    dynamic = {name: {0: "batch"} for name in [*input_names, "embedding"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=input_names,
            output_names=["embedding"],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = wrapper(*args).numpy()
    actual = session.run(None, {name: sample[name] for name in input_names})[0]
    diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    if diff > tolerance:
        raise ExportError(
            f"{path.name}: ONNX output differs from torch by {diff:.2e} (> {tolerance:.0e})"
        )
    log.info("%s: ONNX parity max |diff| = %.2e on %d rows", path.name, diff, len(expected))
    return diff
