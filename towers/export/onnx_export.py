"""Towers to ONNX with a dynamic batch axis, and a parity check against torch."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from towers.model.towers import PositionalTower
from twotower.bundle import layout
from twotower.errors import TwoTowerError

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-5
EXTERNAL_DATA_BYTES = 64 * 2**20
"""An initializer at least this large (an id-embedding table of a large vocabulary: 5M
users x 64 floats is 1.2 GB) is kept in ``<tower>.onnx.data`` beside the graph."""
ALIGNMENT = 2**16  # each external tensor starts on a 64 KiB boundary: onnxruntime maps it


def external_data_file(path: Path) -> Path:
    """Where the large initializers of the ONNX file ``path`` are kept, when it has any."""
    return path.with_name(path.name + layout.WEIGHTS_SUFFIX)


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def attach_weights(
    path: Path, weights: Mapping[str, torch.Tensor], threshold: int, input_names: list[str]
) -> int:
    """Give the ONNX graph ``path``, exported with its weights as graph inputs, those
    ``weights`` (by name) as initializers: the ones of at least ``threshold`` bytes kept in
    :func:`external_data_file`, each at a 64 KiB-aligned offset and written straight from
    the tensor's memory, the others inside the graph. Returns the bytes kept outside;
    raises :class:`ExportError` when the graph then takes other inputs than
    ``input_names`` (a weight the exporter turned into an unnamed input)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))  # the graph alone: a few kB
    graph = model.graph
    data = external_data_file(path)
    moved = 0
    with ExitStack() as stack:
        handle = None
        for value in [value for value in graph.input if value.name in weights]:
            array = weights[value.name].detach().cpu().contiguous().numpy()
            if array.nbytes < threshold:
                graph.initializer.append(numpy_helper.from_array(array, value.name))
                continue
            if handle is None:  # the file exists only when a weight goes in it
                handle = stack.enter_context(open(data, "wb"))
            offset = _aligned(handle.tell())
            handle.write(b"\0" * (offset - handle.tell()))
            array.tofile(handle)
            tensor = onnx.TensorProto(
                name=value.name,
                data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                dims=array.shape,
            )
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, entry in (
                ("location", data.name),
                ("offset", offset),
                ("length", array.nbytes),
            ):
                tensor.external_data.add(key=key, value=str(entry))
            graph.initializer.append(tensor)
            moved += array.nbytes
    inputs = [value for value in graph.input if value.name not in weights]
    extra = [value.name for value in inputs if value.name not in input_names]
    if extra:
        raise ExportError(f"{path.name}: graph inputs {extra} are neither tower inputs nor weights")
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.save_model(model, str(path))
    return moved


class ExportError(TwoTowerError):
    """Export produced something that does not match the trained model."""


def export_tower(
    tower: torch.nn.Module,
    input_names: list[str],
    sample: dict[str, np.ndarray],
    path: Path,
    tolerance: float = PARITY_TOLERANCE,
    external_threshold: int | None = None,
) -> float:
    """Write ``tower`` to ``path`` as ONNX; check it against torch on ``sample``.

    A tower with a weight of at least ``external_threshold`` bytes (default
    :data:`EXTERNAL_DATA_BYTES`) is exported as a graph
    whose weights are inputs, then given them as initializers, the large ones in
    :func:`external_data_file` (:func:`attach_weights`): the exporter never builds the
    model with its weights in memory, and onnxruntime maps the large ones from the file.

    Returns the max absolute difference; raises :class:`ExportError` above ``tolerance``.
    """
    wrapper = PositionalTower(tower, input_names).eval()
    weights = wrapper.state_dict()
    if external_threshold is None:
        external_threshold = EXTERNAL_DATA_BYTES
    large = any(w.numel() * w.element_size() >= external_threshold for w in weights.values())
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
            export_params=not large,
            # folding would turn weights into new, unnamed graph inputs (a Linear on 3-d
            # input becomes MatMul of a folded transpose) that attach_weights cannot fill
            do_constant_folding=not large,
        )
    if large:
        moved = attach_weights(path, weights, external_threshold, input_names)
        log.info(
            "%s: %.0f MB of weights in %s", path.name, moved / 2**20, external_data_file(path).name
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
