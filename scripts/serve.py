"""Serve a bundle over HTTP: ``python scripts/serve.py bundle=PATH [port=8000 workers=2]``,
the same as ``twotower serve bundle=PATH ...``."""

import sys

from twotower.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
