"""The reliability benchmark: ``python scripts/bench_reliability.py [--help]``, the same as
``twotower bench reliability``, run from the checkout (benchmarks are not in the wheel)."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "reliability", *sys.argv[1:]]))
