"""Streamed vs in-memory training: ``python scripts/bench_streaming.py [--help]``, the same as
``twotower bench streaming``, run from the checkout (benchmarks are not in the wheel)."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "streaming", *sys.argv[1:]]))
