"""The Spark session of the jobs: a cluster's (``spark-submit``, ``--master``) or local mode.

The jobs need a few settings whatever the cluster: UTC as the session time zone (date-time
strings without a zone are read as UTC, as the single-machine reader does) and Arrow for
the pandas functions (``mapInPandas``, pandas UDFs).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

# what every job sets, on a cluster too
REQUIRED_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}
# local mode: quiet, no UI, bound to loopback
LOCAL_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.driver.host": "127.0.0.1",
}
# local_session (tests, small data): few partitions as well
SMALL_CONF = {
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "2",
}


class SparkUnavailableError(RuntimeError):
    """pyspark or Java is missing."""


def spark_missing() -> str | None:
    """Why Spark cannot run here (pyspark or Java missing), or None when it can."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (pip install 'twotower[spark]')"
    java_home = os.environ.get("JAVA_HOME")
    if not shutil.which("java") and not (java_home and os.path.exists(java_home)):
        return "java is not installed (Spark needs a Java 17 runtime, e.g. openjdk-17-jre-headless)"
    return None


def spark_session(
    master: str | None = None,
    app_name: str = "twotower",
    conf: Mapping[str, str] | None = None,
):  # -> pyspark.sql.SparkSession (pyspark is imported lazily)
    """The active Spark session, or a new one.

    Under ``spark-submit`` the submitted settings apply (``master`` None); run directly,
    ``master`` None means ``local[*]``. A ``local`` master (``local``, ``local[2]``,
    ``local[*]``) gets :data:`LOCAL_CONF` (no UI, bound to 127.0.0.1). ``conf`` adds or
    overrides settings; the job's required ones (:data:`REQUIRED_CONF`) are always set.
    In local mode the Python workers run this interpreter unless ``PYSPARK_PYTHON`` says
    otherwise.
    """
    reason = spark_missing()
    if reason:
        raise SparkUnavailableError(reason)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    settings: dict[str, str] = {}
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit started this driver
    if master is None and not submitted and SparkSession.getActiveSession() is None:
        master = "local[*]"
    if master is not None:
        builder = builder.master(master)
        if master.startswith("local"):
            settings.update(LOCAL_CONF)
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    settings.update(conf or {})
    settings.update(REQUIRED_CONF)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    for key, value in REQUIRED_CONF.items():  # an existing session gets them too
        spark.conf.set(key, value)
    log.info("spark %s, master %s", spark.version, spark.sparkContext.master)
    return spark


def local_session(cores: int = 2, conf: Mapping[str, str] | None = None):
    """A local-mode session (``local[cores]``) with :data:`LOCAL_CONF` and
    :data:`SMALL_CONF`: tests, small data."""
    return spark_session(f"local[{cores}]", "twotower-local", {**SMALL_CONF, **(conf or {})})
