"""``twotower prepare [options]``: the training data of one experiment, prepared on this
machine without Spark, as a prepared directory (the format ``twotower spark prepare``
writes; see docs/spark.md). Train from it with ``twotower train data=csv
data.prepared=DIR`` and stream its samples with ``data.stream=true``. ``--help``
answers without importing torch or pandas."""

from __future__ import annotations

import argparse
import json
import sys

from twotower.cli.spark import add_prepare_arguments, configure_logging, prepare_settings

HELP = """Prepare the training data of one experiment on this machine: read the interactions
(and the optional item and user tables; a file or a directory of shards, local or at an
fsspec URL), apply the EVALUATION.md split exactly as `twotower train` does, fit the
feature encoders, and write under OUTPUT (a path or a URL) the directory `twotower spark
prepare` writes: encoders.json, samples/ (Parquet shards, one row per training event),
catalogue/, split/ and prepared.json. The files are staged and moved into place when
complete. The split and feature options mirror conf/train.yaml (split.*, features.*)
and have its defaults."""


def build_parser() -> argparse.ArgumentParser:
    """The ``twotower prepare`` argument parser."""
    parser = argparse.ArgumentParser(prog="twotower prepare", description=HELP)
    add_prepare_arguments(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output directory"
    )
    parser.add_argument("--log-level", default="INFO", help="twotower's log level")
    return parser


def run(argv: list[str]) -> int:
    """Parse ``argv``, prepare, print a JSON summary; the exit status (1 on bad input,
    with the reason on stderr; 2 on bad options)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    if not configure_logging("twotower prepare", args.log_level):
        return 2
    from towers.data.prepared_writer import run_local_prepare
    from twotower.errors import TwoTowerError

    try:
        result = run_local_prepare(prepare_settings(args))
    except (TwoTowerError, ValueError, OSError, ImportError, argparse.ArgumentTypeError) as exc:
        # ImportError: a URL whose file system package is missing (s3fs for s3://)
        print(f"twotower prepare: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"output": result.output, **result.manifest["counts"]}))
    return 0
