"""``twotower spark score``: the offline batch jobs over a bundle, in Spark.

- **item vectors**: every item of a catalogue through the bundle's ONNX item tower,
  inside ``mapInPandas`` (one onnxruntime session per partition iterator), written as
  Parquet ``(item_id, vector)``;
- **top-k**: every user's ``k`` best items through :meth:`retrieval.Retriever.retrieve`
  (one :class:`~retrieval.Retriever` per executor Python process, kept in a module-level
  cache keyed by the bundle's path), written as Parquet ``(user_id, item_ids, scores,
  served_by)``.

The bundle is a local directory on the driver; it is shipped to the executors as an
archive (``SparkContext.addArchive``), or read at the same path on every node when it
sits on a shared file system (``ship_bundle=False``). Only torch-free code runs here (the
base install plus pyspark).
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark import SparkFiles
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from retrieval import Retriever
from retrieval.requests import check_boost, check_k
from twotower.bundle import layout, open_bundle, read_manifest
from twotower.bundle.store import sha256_of
from twotower.encoding import FeatureEncoders
from twotower.errors import MissingFileError, RequestError
from twotower.spark.frames import release
from twotower.spark.storage import check_output, join, prepare_output
from twotower.spark.tables import is_local, local_path, read_table, string_ids

log = logging.getLogger(__name__)

ITEMS_JOB = "items"
TOPK_JOB = "topk"
JOBS = (ITEMS_JOB, TOPK_JOB)
ITEM_VECTORS = "item_vectors"
TOP_K = "top_k"
VECTOR = "vector"
ITEM_IDS = "item_ids"
SCORES = "scores"
SERVED_BY = "served_by"
ITEM_VECTOR_SCHEMA = T.StructType(
    [
        T.StructField(layout.ITEM_ID, T.StringType(), False),
        T.StructField(VECTOR, T.ArrayType(T.FloatType(), False), False),
    ]
)
TOP_K_SCHEMA = T.StructType(
    [
        T.StructField(layout.USER_ID, T.StringType(), False),
        T.StructField(ITEM_IDS, T.ArrayType(T.StringType(), False), False),
        T.StructField(SCORES, T.ArrayType(T.FloatType(), False), False),
        T.StructField(SERVED_BY, T.StringType(), False),
    ]
)

_RETRIEVERS: dict[str, Retriever] = {}  # per executor Python process, by bundle path


def cached_retriever(path: str, threads: int | None = None) -> Retriever:
    """The :class:`Retriever` of the bundle at ``path``, loaded once per process."""
    found = _RETRIEVERS.get(path)
    if found is None:
        log.info("loading bundle %s", path)
        found = _RETRIEVERS[path] = Retriever.load(path, threads=threads)
    return found


@dataclass(frozen=True)
class BundleOnExecutors:
    """Where the executors find the bundle: the archive shipped with the job (``archive``)
    or the driver's path itself (a shared file system, or local mode)."""

    path: str
    archive: str | None = None

    def local_path(self) -> str:
        """The bundle directory as this executor sees it."""
        if self.archive is None:
            return self.path
        return str(Path(SparkFiles.get(self.archive)) / "bundle")


_SHIPPED: set[tuple[str, str]] = set()  # (Spark application, archive) shipped already


def ship_bundle(spark: SparkSession, bundle: Path, digest: str) -> BundleOnExecutors:
    """Ship the bundle's files to every executor as one archive (named by a digest of its
    manifest, so two bundles never clash), unpacked by Spark (``addArchive``). The archive
    is staged in a temporary directory removed when this process exits."""
    archive_name = f"twotower-bundle-{digest[:16]}.tar"
    shipped = (spark.sparkContext.applicationId, archive_name)
    if shipped not in _SHIPPED:
        staging = Path(tempfile.mkdtemp(prefix="twotower-spark-"))
        atexit.register(shutil.rmtree, staging, True)
        archive = staging / archive_name
        with tarfile.open(archive, "w") as tar:
            for path in sorted(bundle.iterdir()):
                if path.is_file():
                    tar.add(path, arcname=f"bundle/{path.name}")
        spark.sparkContext.addArchive(str(archive))
        _SHIPPED.add(shipped)
        log.info("shipping bundle %s to the executors as %s", bundle, archive_name)
    return BundleOnExecutors(str(bundle), archive_name)


@dataclass
class ScoreSettings:
    """What ``twotower spark score`` takes."""

    bundle: str
    output: str
    jobs: tuple[str, ...] = JOBS
    items: str | None = None  # a table to embed (item_id + attributes); None: the bundle's
    users: str | None = None  # a table with user_id; None: the bundle's users
    format: str | None = None
    k: int = 10
    exclude_seen: bool = True
    new_item_boost: float = 0.0
    batch_size: int = 1024
    threads: int = 1
    ship_bundle: bool = True
    overwrite: bool = False
    conf: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """A :class:`RequestError`, ``ValueError`` or bundle / file error naming a bad
        setting (before Spark starts)."""
        unknown = [job for job in self.jobs if job not in JOBS]
        if unknown or not self.jobs:
            raise ValueError(f"jobs must be among {JOBS}, got {list(self.jobs)}")
        check_k(self.k)
        check_boost(self.new_item_boost)
        if self.batch_size < 1 or self.threads < 1:
            raise RequestError("batch_size and threads must be positive")
        read_manifest(Path(self.bundle))  # a missing or foreign bundle fails before Spark
        for table in (self.items, self.users):
            if table is not None and is_local(table) and not local_path(table).exists():
                raise MissingFileError(f"{table}: no such file or directory")


@dataclass
class ScoreResult:
    """What the job wrote: the output directories by job, and their row counts."""

    outputs: dict[str, str]
    rows: dict[str, int]


def _session_options(threads: int):  # -> onnxruntime.SessionOptions
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def item_vectors(
    items: DataFrame, where: BundleOnExecutors, batch_size: int = 1024, threads: int = 1
) -> DataFrame:
    """``(item_id, vector)`` for every row of ``items`` (``item_id`` as strings, and any of
    the bundle's item attribute columns; missing ones count as unknown), computed by the
    bundle's ONNX item tower on the executors: the encoders and one onnxruntime session
    are loaded once per partition iterator."""

    def embed(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import onnxruntime as ort

        bundle = Path(where.local_path())
        encoders = FeatureEncoders.load(bundle / layout.ENCODERS)
        session = ort.InferenceSession(
            str(bundle / layout.ITEM_TOWER),
            _session_options(threads),
            providers=["CPUExecutionProvider"],
        )
        names = [i.name for i in session.get_inputs()]
        for batch in batches:
            for start in range(0, len(batch), batch_size):
                chunk = batch.iloc[start : start + batch_size].reset_index(drop=True)
                inputs = encoders.item_inputs(chunk)
                vectors = session.run(None, {n: inputs[n] for n in names})[0]
                yield pd.DataFrame(
                    {
                        layout.ITEM_ID: chunk[layout.ITEM_ID].astype(str).to_numpy(object),
                        VECTOR: list(np.asarray(vectors, dtype=np.float32)),
                    }
                )

    return items.mapInPandas(embed, ITEM_VECTOR_SCHEMA)


def top_k(
    users: DataFrame,
    where: BundleOnExecutors,
    k: int = 10,
    exclude_seen: bool = True,
    new_item_boost: float = 0.0,
    batch_size: int = 1024,
    threads: int = 1,
) -> DataFrame:
    """``(user_id, item_ids, scores, served_by)`` for every row of ``users`` (``user_id`` as
    strings): :meth:`Retriever.retrieve` on batches of users, with one Retriever per
    executor Python process. Lists are best first and shorter than ``k`` only when fewer
    items pass the exclusions (``recommend_batch``'s padding is dropped)."""
    k = check_k(k)
    boost = check_boost(new_item_boost)

    def recommend(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        retriever = cached_retriever(where.local_path(), threads)
        for batch in batches:
            for start in range(0, len(batch), batch_size):
                ids = batch[layout.USER_ID].iloc[start : start + batch_size].astype(str).tolist()
                found = retriever.retrieve(
                    user_ids=ids, k=k, exclude_seen=exclude_seen, new_item_boost=boost
                )
                kept = [[i for i in row if i is not None] for row in found.ids]
                yield pd.DataFrame(
                    {
                        layout.USER_ID: ids,
                        ITEM_IDS: [[str(i) for i in row] for row in kept],
                        SCORES: [
                            np.asarray(scores[: len(row)], dtype=np.float32)
                            for scores, row in zip(found.scores, kept, strict=True)
                        ],
                        SERVED_BY: list(found.served_by),
                    }
                )

    return users.mapInPandas(recommend, TOP_K_SCHEMA)


def _bundle_table(
    spark: SparkSession, path: Path, id_column: str, columns: list[str] | None = None
) -> DataFrame:
    """A table of the bundle (read on the driver: the bundle holds it) as a DataFrame,
    without the bundle's reserved columns."""
    table = pd.read_parquet(path, columns=columns)
    keep = [c for c in table.columns if not str(c).startswith(layout.RESERVED_PREFIX)]
    return spark.createDataFrame(table[keep].astype({id_column: str}))


def run_score(spark: SparkSession, settings: ScoreSettings) -> ScoreResult:
    """Run the jobs of ``settings.jobs`` over the bundle; writes ``item_vectors/`` and / or
    ``top_k/`` under ``settings.output``. Every input is checked before anything is
    written; :class:`~twotower.errors.TwoTowerError` subclasses name the bundle, file or
    column that is wrong."""
    settings.check()
    try:
        return _score(spark, settings)
    finally:
        release()


def _score(spark: SparkSession, settings: ScoreSettings) -> ScoreResult:
    check_output(spark, settings.output, settings.overwrite)
    bundle, _ = open_bundle(settings.bundle)  # checks the manifest and checksums
    inputs: dict[str, DataFrame] = {}
    if ITEMS_JOB in settings.jobs:
        if settings.items is None:
            encoders = FeatureEncoders.load(bundle / layout.ENCODERS)
            wanted = [layout.ITEM_ID, *encoders.items.columns.all]
            inputs[ITEMS_JOB] = _bundle_table(spark, bundle / layout.ITEMS, layout.ITEM_ID, wanted)
        else:
            inputs[ITEMS_JOB] = string_ids(
                read_table(spark, settings.items, settings.format, (layout.ITEM_ID,)),
                layout.ITEM_ID,
                settings.items,
                "item",
            )
    if TOPK_JOB in settings.jobs:
        if settings.users is None:
            users = _bundle_table(spark, bundle / layout.USERS, layout.USER_ID, [layout.USER_ID])
        else:
            users = string_ids(
                read_table(spark, settings.users, settings.format, (layout.USER_ID,)),
                layout.USER_ID,
                settings.users,
                "user",
            )
        inputs[TOPK_JOB] = users.select(layout.USER_ID)
    prepare_output(spark, settings.output, settings.overwrite)
    where = (
        ship_bundle(spark, bundle, sha256_of(bundle / layout.MANIFEST))
        if settings.ship_bundle
        else BundleOnExecutors(str(bundle))
    )
    outputs: dict[str, str] = {}
    if ITEMS_JOB in inputs:
        outputs[ITEMS_JOB] = join(settings.output, ITEM_VECTORS)
        vectors = item_vectors(inputs[ITEMS_JOB], where, settings.batch_size, settings.threads)
        vectors.write.parquet(outputs[ITEMS_JOB])
    if TOPK_JOB in inputs:
        outputs[TOPK_JOB] = join(settings.output, TOP_K)
        found = top_k(
            inputs[TOPK_JOB],
            where,
            settings.k,
            settings.exclude_seen,
            settings.new_item_boost,
            settings.batch_size,
            settings.threads,
        )
        found.write.parquet(outputs[TOPK_JOB])
    rows = {job: spark.read.parquet(path).count() for job, path in outputs.items()}
    log.info("scored with %s: %s", bundle, rows)
    return ScoreResult(outputs, rows)


def read_vectors(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(item ids, float32 vectors (n, d))`` from an ``item_vectors/`` output (pyarrow)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    ids = np.asarray(table.column(layout.ITEM_ID).to_pylist(), dtype=object)
    column = table.column(VECTOR).combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return ids, flat.reshape(len(ids), -1) if len(ids) else flat.reshape(0, 0)
