"""Peak RSS of exporting a tower with many id rows to ONNX (and its parity check).

twotower bench onnx_memory [--rows 5000000] [--dim 64]
Writes docs/benchmarks/onnx_memory.json and onnx_memory.md: the tower's weights, the
process's RSS before the export, and the peak while ``towers.export.onnx_export.
export_tower`` writes the ONNX file and checks it against torch with onnxruntime, both
ways in one run: the weights inside the ONNX file, and (what export does for a weight of
64 MB or more) in ``<tower>.onnx.data`` beside it. The 100M-event rung of the scale
ladder has 5M user-id rows of 64 floats.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.report import write_report
from benchmarks.scale import GB, PeakRss, rss_bytes

OUT = Path("docs/benchmarks/onnx_memory")


def main(argv: list[str] | None = None) -> None:
    import torch
    from torch import nn

    from towers.export.onnx_export import export_tower

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="id rows of the tower")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT, help="output stem (.json/.md)")
    args = parser.parse_args(argv)

    class IdTower(nn.Module):
        """An id embedding and a projection: the shape of a user tower's bulk."""

        def __init__(self, rows: int, dim: int) -> None:
            super().__init__()
            self.ids = nn.Embedding(rows, dim)
            self.out = nn.Linear(dim, dim)

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.out(self.ids(inputs["user_id"]))

    tower = IdTower(args.rows, args.dim).eval()
    sample = {"user_id": np.random.default_rng(0).integers(0, args.rows, 256)}
    rows = []
    for mode, threshold in (("in the .onnx file", 2**62), ("external data (.onnx.data)", None)):
        before = rss_bytes() / GB
        sampler = PeakRss()
        measured: dict[str, float] = {}
        with sampler.stage(measured), tempfile.TemporaryDirectory() as work:
            path = Path(work) / "t.onnx"
            diff = export_tower(tower, ["user_id"], sample, path, external_threshold=threshold)
            size = path.stat().st_size / GB
            data = path.with_name(path.name + ".data")
            data_size = data.stat().st_size / GB if data.exists() else 0.0
        sampler.close()
        peak, seconds = measured["peak_rss_gb"], measured["seconds"]
        row = {
            "weights": mode,
            "id rows": args.rows,
            "dim": args.dim,
            "weights GB": round(args.rows * args.dim * 4 / GB, 3),
            "ONNX file GB": round(size, 3),
            "weights file GB": round(data_size, 3),
            "RSS before GB": round(before, 3),
            "peak RSS GB": round(peak, 3),
            "peak over before GB": round(peak - before, 3),
            "seconds": round(seconds, 1),
            "parity max abs diff": diff,
        }
        rows.append(row)
        print(row)
    write_report(
        args.out,
        "ONNX export memory",
        "`export_tower` (ONNX export, then the onnxruntime parity check on 256 rows) of a "
        "tower holding an id embedding, both ways in one process, one after the other "
        "(`benchmarks/bench_onnx_memory.py`). Produced by:"
        f"\n\n```\ntwotower bench onnx_memory --rows {args.rows} --dim {args.dim}\n```",
        {"rows": args.rows, "dim": args.dim},
        rows,
        list(rows[0]),
    )


if __name__ == "__main__":
    main()
