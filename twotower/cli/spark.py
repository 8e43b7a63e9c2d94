"""``twotower spark prepare|score [options]``: the Spark jobs, for data past one machine.

- ``prepare``: the EVALUATION.md split, the feature encoders and the training shards of
  one experiment, from interactions (and optional item and user tables) in Parquet or CSV
  at local paths or any URL Spark reads (hdfs://, s3a://, ...);
- ``score``: the offline batch jobs over a bundle: every item's vector through the ONNX
  item tower, and every user's top-k through the Retriever.

Both run in local mode by default (``--master local[*]``) and take the cluster's settings
under ``spark-submit`` (see docs/spark.md). They need the ``spark`` extra (pyspark) and
Java 17. ``--help`` answers without starting Spark.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twotower.spark.settings import PrepareSettings

PREPARE_HELP = """Prepare the training data of one experiment in Spark: read the interactions
(and the optional item and user tables), apply the EVALUATION.md split exactly as
`twotower train` does (per-user temporal hold-out, or --cold-items), fit the feature
encoders with the same rules, and write under OUTPUT: encoders.json (the bundle's
format), samples/ (Parquet shards of integer codes, one row per training event),
catalogue/, split/ and prepared.json. The split and feature options mirror conf/train.yaml
(split.*, features.*) and have its defaults."""

SCORE_HELP = """Run the offline batch jobs over a bundle in Spark: `items` embeds every item
of the catalogue (the bundle's, or --items TABLE) with the bundle's ONNX item tower and
writes OUTPUT/item_vectors (item_id, vector); `topk` ranks the k best items for every
user (the bundle's users, or --users TABLE with a user_id column) through the Retriever
and writes OUTPUT/top_k (user_id, item_ids, scores, served_by). The bundle directory is
shipped to the executors (or read in place with --bundle-shared)."""


def _key_values(words: list[str], option: str) -> dict[str, str]:
    out = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{option} {word!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _common(parser: argparse.ArgumentParser) -> None:
    spark = parser.add_argument_group("spark")
    spark.add_argument(
        "--master",
        default=None,
        help="Spark master URL (default: local[*] when run directly; the submitted one "
        "under spark-submit)",
    )
    spark.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Spark setting, repeatable (e.g. --conf spark.sql.shuffle.partitions=400)",
    )
    parser.add_argument(
        "--format",
        choices=("parquet", "csv", "tsv"),
        default=None,
        help="the input tables' format (default: from the suffix; a directory is Parquet)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output directory"
    )
    parser.add_argument("--log-level", default="INFO", help="twotower's log level")


def add_prepare_arguments(prepare: argparse.ArgumentParser) -> None:
    """The options of both prepare jobs (``twotower prepare`` and ``twotower spark
    prepare``): the inputs, the output, the split, the features and the shard size."""
    prepare.add_argument("--interactions", required=True, help="interactions table (path/URL)")
    prepare.add_argument("--items", default=None, help="item table (default: none)")
    prepare.add_argument("--users", default=None, help="user table (default: none)")
    prepare.add_argument("--output", required=True, help="output directory (path/URL)")
    prepare.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="OURS=THEIRS",
        help="the tables' own name of a column (user_id, item_id, timestamp, weight, "
        "rating), repeatable: --column user_id=customer_id",
    )
    prepare.add_argument(
        "--unknown-items",
        choices=("error", "drop"),
        default="error",
        help="interactions whose item is not in the item table",
    )
    prepare.add_argument("--min-rating", type=float, default=None, help="rating threshold")
    split = prepare.add_argument_group("split (conf/train.yaml split.*)")
    split.add_argument("--test-fraction", type=float, default=0.2)
    split.add_argument("--validation-fraction", type=float, default=0.1)
    split.add_argument("--min-interactions", type=int, default=5)
    split.add_argument("--cold-items", action="store_true", help="the cold-item variant")
    split.add_argument("--cold-fraction", type=float, default=0.1)
    split.add_argument("--seed", type=int, default=42, help="the cold-item draw's seed")
    split.add_argument(
        "--fit-on",
        choices=("fit", "train"),
        default="fit",
        help="samples of the fit part (model selection) or of all of train (the refit)",
    )
    features = prepare.add_argument_group("features (conf/train.yaml features.*)")
    features.add_argument("--history-length", type=int, default=50)
    features.add_argument("--no-item-id", action="store_true", help="use_item_id=false")
    features.add_argument("--no-user-id", action="store_true", help="use_user_id=false")
    features.add_argument("--id-min-count", type=int, default=1)
    features.add_argument("--category-min-count", type=int, default=1)
    features.add_argument("--max-bag-tokens", type=int, default=16)
    features.add_argument("--separator", default="|")
    features.add_argument("--text-buckets", type=int, default=1 << 14)
    features.add_argument("--max-text-tokens", type=int, default=8)
    features.add_argument("--text-min-count", type=int, default=1)
    columns = prepare.add_argument_group(
        "feature columns",
        "Comma-separated column names per kind; giving any --item-* (--user-*) option "
        "turns the dtype-based inference off for the item (user) table.",
    )
    for side in ("item", "user"):
        for kind in ("categorical", "multi-hot", "numeric", "text"):
            columns.add_argument(f"--{side}-{kind}", type=_names, default=None, metavar="A,B")
    prepare.add_argument(
        "--samples-per-shard", type=int, default=1_000_000, help="rows per samples/ file"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``twotower spark`` argument parser (no Spark import)."""
    parser = argparse.ArgumentParser(
        prog="twotower spark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="job", metavar="{prepare,score}", required=True)

    prepare = commands.add_parser(
        "prepare", help="split, encoders and training shards", description=PREPARE_HELP
    )
    add_prepare_arguments(prepare)
    _common(prepare)

    score = commands.add_parser(
        "score", help="item vectors and top-k over a bundle", description=SCORE_HELP
    )
    score.add_argument("--bundle", required=True, help="bundle directory (local to the driver)")
    score.add_argument("--output", required=True, help="output directory (path/URL)")
    score.add_argument(
        "--jobs",
        type=_names,
        default=["items", "topk"],
        metavar="items,topk",
        help="which jobs to run (default: both)",
    )
    score.add_argument("--items", default=None, help="item table to embed (default: bundle's)")
    score.add_argument("--users", default=None, help="user table to rank for (default: bundle's)")
    score.add_argument("--k", type=int, default=10, help="items per user")
    score.add_argument(
        "--include-seen", action="store_true", help="do not exclude the users' seen items"
    )
    score.add_argument("--new-item-boost", type=float, default=0.0)
    score.add_argument("--batch-size", type=int, default=1024, help="rows per tower call")
    score.add_argument("--threads", type=int, default=1, help="threads per Python worker")
    score.add_argument(
        "--bundle-shared",
        action="store_true",
        help="the executors read the bundle at the same path (a shared file system) "
        "instead of a shipped copy",
    )
    _common(score)
    return parser


def _columns(args: argparse.Namespace, side: str) -> Any:
    from twotower.encoding import FeatureColumns

    kinds = {"categorical": "categorical", "multi_hot": "multi-hot", "numeric": "numeric"}
    kinds["text"] = "text"
    given = {field: getattr(args, f"{side}_{field}") for field in kinds}
    if all(value is None for value in given.values()):
        return None
    return FeatureColumns(**{field: list(value or []) for field, value in given.items()})


def prepare_settings(args: argparse.Namespace) -> PrepareSettings:
    """The parsed ``prepare`` options as :class:`~twotower.spark.settings.PrepareSettings`
    (no Spark import)."""
    from towers.data.prepare import FeatureSettings
    from twotower.spark.settings import PrepareSettings

    features = FeatureSettings(
        history_length=args.history_length,
        use_item_id=not args.no_item_id,
        use_user_id=not args.no_user_id,
        id_min_count=args.id_min_count,
        category_min_count=args.category_min_count,
        max_bag_tokens=args.max_bag_tokens,
        separator=args.separator,
        text_buckets=args.text_buckets,
        max_text_tokens=args.max_text_tokens,
        text_min_count=args.text_min_count,
        item_columns=_columns(args, "item"),
        user_columns=_columns(args, "user"),
    )
    return PrepareSettings(
        interactions=args.interactions,
        output=args.output,
        items=args.items,
        users=args.users,
        format=getattr(args, "format", None),
        columns=_key_values(args.column, "--column"),
        unknown_items=args.unknown_items,
        min_rating=args.min_rating,
        test_fraction=args.test_fraction,
        validation_fraction=args.validation_fraction,
        min_interactions=args.min_interactions,
        cold_items=args.cold_items,
        cold_fraction=args.cold_fraction,
        seed=args.seed,
        fit_on=args.fit_on,
        features=features,
        samples_per_shard=args.samples_per_shard,
        overwrite=args.overwrite,
    )


def score_settings(args: argparse.Namespace) -> Any:
    """The parsed ``score`` options as :class:`~twotower.spark.score.ScoreSettings`."""
    from twotower.spark.score import ScoreSettings

    return ScoreSettings(
        bundle=args.bundle,
        output=args.output,
        jobs=tuple(args.jobs),
        items=args.items,
        users=args.users,
        format=args.format,
        k=args.k,
        exclude_seen=not args.include_seen,
        new_item_boost=args.new_item_boost,
        batch_size=args.batch_size,
        threads=args.threads,
        ship_bundle=not args.bundle_shared,
        overwrite=args.overwrite,
    )


def configure_logging(prog: str, level_name: str) -> bool:
    """Log at ``level_name`` (``--log-level``); False, after saying so on stderr, when it
    names no level."""
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        print(f"{prog}: --log-level {level_name!r} is not a level", file=sys.stderr)
        return False
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return True


def run(argv: list[str]) -> int:
    """Parse ``argv``, run the job, print a JSON summary; the exit status (1 on bad input,
    with the reason on stderr; 2 on bad options)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    name = f"twotower spark {args.job}"
    if not configure_logging(name, args.log_level):
        return 2
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from twotower.errors import TwoTowerError
    from twotower.spark.session import SparkUnavailableError, spark_missing, spark_session

    spark, started = None, False
    try:
        missing = spark_missing()  # before anything imports pyspark
        if missing is not None:
            raise SparkUnavailableError(f"cannot run: {missing}")
        conf = _key_values(args.conf, "--conf")
        settings = prepare_settings(args) if args.job == "prepare" else score_settings(args)
        settings.check()
        from pyspark.sql import SparkSession

        started = SparkSession.getActiveSession() is None  # stop only a session of ours
        spark = spark_session(args.master, f"twotower-spark-{args.job}", conf)
        if args.job == "prepare":
            from twotower.spark.prepare import run_prepare

            result = run_prepare(spark, settings)
            summary: dict[str, Any] = {"output": result.output, **result.manifest["counts"]}
        else:
            from twotower.spark.score import run_score

            found = run_score(spark, settings)
            summary = {"outputs": found.outputs, "rows": found.rows}
    except (TwoTowerError, ValueError, SparkUnavailableError, argparse.ArgumentTypeError) as exc:
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # Spark's own errors (an unreadable URL, a failed task)
        if type(exc).__module__.startswith(("pyspark", "py4j")):
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        if spark is not None and started:
            spark.stop()
    print(json.dumps(summary))
    return 0
