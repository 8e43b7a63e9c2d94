"""Export a bundle from a training run: ``python scripts/export.py RUN_DIR [--out DIR]``,
the same as ``twotower export RUN_DIR [--out DIR]``."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
