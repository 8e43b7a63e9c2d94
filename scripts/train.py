"""Train, evaluate and export a twotower model: ``python scripts/train.py [overrides]``,
the same as ``twotower train [overrides]``."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
