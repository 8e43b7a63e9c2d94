"""``twotower bench NAME [args ...]``: run a benchmark of the checkout's ``benchmarks/``
(not in the wheel): quality, retrieval, serving, training, main_job, reliability, scale,
large_catalogue, continuous, streaming or onnx_memory. Run it from the checkout's root;
``twotower bench NAME --help`` describes each."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

NAMES = (
    "quality",
    "retrieval",
    "serving",
    "training",
    "main_job",
    "reliability",
    "scale",
    "large_catalogue",
    "continuous",
    "streaming",
    "onnx_memory",
)


def checkout_root() -> Path | None:
    """The checkout holding ``benchmarks/``: the current directory, or the one above the
    script that was run (``scripts/bench_*.py``)."""
    for candidate in (Path.cwd(), Path(sys.argv[0]).resolve().parent.parent):
        if (candidate / "benchmarks" / "__init__.py").is_file():
            return candidate
    return None


def run(argv: list[str]) -> int:
    """Import ``benchmarks.bench_NAME`` from the checkout and run its ``main``."""
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in NAMES:
        print(f"usage: twotower bench {{{','.join(NAMES)}}} [args ...]\n\n{__doc__}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    root = checkout_root()
    if root is None:
        print(
            "twotower bench: no benchmarks/ here; run it from the root of a twotower checkout",
            file=sys.stderr,
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"benchmarks.bench_{argv[0]}")
    module.main(argv[1:])
    return 0
