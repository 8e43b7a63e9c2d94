"""The retrieval benchmark: ``python scripts/bench_retrieval.py [--help]``, the same as
``twotower bench retrieval``, run from the checkout (benchmarks are not in the wheel)."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "retrieval", *sys.argv[1:]]))
