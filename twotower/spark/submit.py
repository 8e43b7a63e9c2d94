"""The file to hand to ``spark-submit``: ``spark-submit [spark options] PATH/submit.py
prepare|score [job options]`` runs ``twotower spark prepare|score`` with the cluster's
settings. ``python -c "import twotower.spark.submit as m; print(m.__file__)"`` prints
PATH."""

from __future__ import annotations

import sys

from twotower.cli.spark import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
