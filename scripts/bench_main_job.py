"""The main_job benchmark: ``python scripts/bench_main_job.py [--help]``, the same as
``twotower bench main_job``, run from the checkout (benchmarks are not in the wheel)."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "main_job", *sys.argv[1:]]))
