"""Output directories and small files on any file system Spark writes to: local paths
through Python, URLs (``hdfs://``, ``s3a://``, ...) through Hadoop's ``FileSystem`` of the
Spark session."""

from __future__ import annotations

import shutil
from typing import Any

from pyspark.sql import SparkSession

from twotower.errors import DataValidationError
from twotower.spark.tables import is_local, local_path


def join(base: str, name: str) -> str:
    """``base/name`` for a path or a URL."""
    return f"{base.rstrip('/')}/{name}"


def _hadoop(spark: SparkSession, path: str) -> tuple[Any, Any]:
    jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)  # type: ignore[union-attr]
    conf = spark.sparkContext._jsc.hadoopConfiguration()  # type: ignore[union-attr]
    return hadoop_path.getFileSystem(conf), hadoop_path


def _occupied(spark: SparkSession, path: str) -> bool:
    if is_local(path):
        directory = local_path(path)
        return directory.exists() and (not directory.is_dir() or any(directory.iterdir()))
    fs, hadoop_path = _hadoop(spark, path)
    return bool(fs.exists(hadoop_path) and len(fs.listStatus(hadoop_path)) > 0)


def check_output(spark: SparkSession, path: str, overwrite: bool) -> None:
    """Refuse an output directory ``path`` that exists and is not empty, unless
    ``overwrite`` (a job checks this first, before any work)."""
    if not overwrite and _occupied(spark, path):
        raise DataValidationError(
            f"{path}: the output directory exists and is not empty (use --overwrite)"
        )


def prepare_output(spark: SparkSession, path: str, overwrite: bool) -> None:
    """Make directory ``path`` ready for the job's files: absent or empty, or deleted
    first with ``overwrite`` (see :func:`check_output`)."""
    check_output(spark, path, overwrite)
    if is_local(path):
        directory = local_path(path)
        if _occupied(spark, path):
            if directory.is_dir():
                shutil.rmtree(directory)
            else:
                directory.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        return
    fs, hadoop_path = _hadoop(spark, path)
    if _occupied(spark, path):
        fs.delete(hadoop_path, True)
    fs.mkdirs(hadoop_path)


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Write a small text file (JSON) at ``path``."""
    if is_local(path):
        local_path(path).write_text(text, encoding="utf-8")
        return
    fs, hadoop_path = _hadoop(spark, path)
    stream = fs.create(hadoop_path, True)
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()
