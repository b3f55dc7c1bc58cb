"""The Spark session of a feature job, configured from the settings."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from shopsight.platform import MissingDependencyError, Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def build_spark(settings: Settings, app_name: str = "shopsight-features") -> SparkSession:
    """Get or create the Spark session for ``settings.spark``, in the shop's timezone.

    The session timezone is the shop's: ``to_date(ts)`` is then the shop-local day, which is what
    partitions, snapshots and labels mean by "day".
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:  # pragma: no cover - pyspark is a core dependency
        raise MissingDependencyError("Spark is missing: pip install 'pyspark==4.3.0'") from exc
    # Spark's Python workers must run this interpreter (the venv's), or Python stages fail to import.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    spark = settings.spark
    builder = (
        SparkSession.builder.appName(app_name)
        .master(spark.master)
        .config("spark.driver.memory", spark.driver_memory)
        .config("spark.driver.bindAddress", spark.bind_address)
        .config("spark.driver.host", spark.bind_address)
        .config("spark.sql.session.timeZone", settings.data.timezone)
        .config("spark.sql.shuffle.partitions", str(spark.shuffle_partitions))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        # Parquet readers elsewhere (pyarrow, Feast) want microsecond timestamps, not INT96.
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    )
    for key, value in spark.conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


@contextmanager
def spark_session(settings: Settings) -> Iterator[SparkSession]:
    """A Spark session for one command; stopped at the end unless it existed before (tests share one)."""
    from pyspark.sql import SparkSession

    existing = SparkSession.getActiveSession()
    session = build_spark(settings)
    try:
        yield session
    finally:
        if existing is None:
            session.stop()
