"""The continuous-retraining benchmark: ``python scripts/bench_continuous.py [--help]``, the
same as ``twotower bench continuous``, run from the checkout (benchmarks are not in the
wheel)."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "continuous", *sys.argv[1:]]))
