"""The training benchmark: ``python scripts/bench_training.py [--help]``, the same as
``twotower bench training``, run from the checkout (benchmarks are not in the wheel)."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "training", *sys.argv[1:]]))
