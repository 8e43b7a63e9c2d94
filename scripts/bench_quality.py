"""The quality benchmark: ``python scripts/bench_quality.py [--help]``, the same as
``twotower bench quality``, run from the checkout (benchmarks are not in the wheel)."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "quality", *sys.argv[1:]]))
