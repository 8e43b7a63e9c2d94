"""The large-catalogue benchmark: ``python scripts/bench_large_catalogue.py [--help]``, the
same as ``twotower bench large_catalogue``, run from the checkout."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "large_catalogue", *sys.argv[1:]]))
