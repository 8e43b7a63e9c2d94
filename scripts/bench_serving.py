"""The serving benchmark: ``python scripts/bench_serving.py [--help]``, the same as
``twotower bench serving``, run from the checkout (benchmarks are not in the wheel)."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "serving", *sys.argv[1:]]))
