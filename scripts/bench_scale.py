"""The scale ladder: ``python scripts/bench_scale.py [--help]``, the same as
``twotower bench scale``, run from the checkout (benchmarks are not in the wheel)."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "scale", *sys.argv[1:]]))
