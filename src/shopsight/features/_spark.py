"""The Spark session of a feature job, configured from the settings."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

from shopsight.platform import MissingDependencyError, Settings

log = logging.getLogger("shopsight.features")

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
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        # Parquet readers elsewhere (pyarrow, Feast) want microsecond timestamps, not INT96.
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    )
    # A command's own Spark has no UI: nobody looks at it, and it would be one more listening port. A
    # submitted job (spark-submit's --conf, a SparkApplication's sparkConf) decides for itself: the builder's
    # values would replace the submitted ones when the context starts.
    submitted = submitted_conf()
    for key, value in _LOCAL_ONLY_CONF.items():
        if key not in submitted:
            builder = builder.config(key, value)
    for key, value in spark.conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    # The driver's accumulator server reads updates from the JVM; a JVM that dies (killed, out of memory)
    # ends that stream, and socketserver would print the EOFError's traceback to the console. The death
    # itself reaches the command as the error of its next call into the JVM.
    server = getattr(session.sparkContext, "_accumulatorServer", None)
    if server is not None:
        server.handle_error = _accumulator_stream_ended
    return session


_LOCAL_ONLY_CONF = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"}


def submitted_conf() -> dict[str, str]:
    """The configuration spark-submit started this Python process with (its ``--conf`` values and
    defaults file: a SparkApplication's ``sparkConf``); empty when this process starts Spark itself."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # spark-submit's JVM is the gateway; else none is running
        return {}
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()
    return dict(SparkConf().getAll())


def _accumulator_stream_ended(request, client_address) -> None:
    log.debug("Spark's accumulator stream from %s ended", client_address, exc_info=True)


@contextmanager
def spark_session(settings: Settings) -> Iterator[SparkSession]:
    """A Spark session for one command; stopped at the end unless it existed before (tests share one).

    Where the command fails, the session is stopped as far as it still can be: a JVM that was killed
    cannot be stopped, and the error of that attempt must not replace the command's own.
    """
    from pyspark.sql import SparkSession

    existing = SparkSession.getActiveSession()
    session = build_spark(settings)
    try:
        yield session
    except BaseException:
        if existing is None:
            with suppress(Exception):  # a JVM that is gone (ConnectionRefusedError) has nothing to stop
                session.stop()
        raise
    if existing is None:
        session.stop()


# Spark's loggers that print a failing task or write job, with its Java stack trace, to the console. The
# driver receives the same failure as an exception, which the command turns into its message.
_TASK_FAILURE_LOGGERS = (
    "org.apache.spark.executor.Executor",  # Exception in task ...
    "org.apache.spark.scheduler.TaskSetManager",  # Task 0 in stage ... failed 1 times; aborting job
    "org.apache.spark.sql.execution.datasources.FileFormatWriter",  # Aborting job ...
    "org.apache.spark.util.Utils",  # Aborting task
)


@contextmanager
def task_failures_unlogged(spark: SparkSession) -> Iterator[None]:
    """Keep Spark from logging failed tasks and writes to the console while the block runs.

    A failure still reaches the caller as an exception (with its Java causes); only the duplicate the
    JVM would print to stderr first, a Java stack trace before the command's one-line error, is left
    out. The loggers get back their own levels (or none: the root's) afterwards.
    """
    jvm = spark.sparkContext._jvm
    context = jvm.org.apache.logging.log4j.core.LoggerContext.getContext(False)
    config = context.getConfiguration()
    own = {}
    for name in _TASK_FAILURE_LOGGERS:
        logger = config.getLoggerConfig(name)
        own[name] = logger.getExplicitLevel() if logger.getName() == name else None
    off = jvm.org.apache.logging.log4j.Level.OFF
    for name in _TASK_FAILURE_LOGGERS:
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, off)
    try:
        yield
    finally:
        with suppress(Exception):  # a JVM that is gone has no logger left to restore
            for name, level in own.items():
                if level is None:
                    config.removeLogger(name)
                else:
                    jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, level)
            context.updateLoggers()


@contextmanager
def task_progress(spark: SparkSession, report: Callable[[int, int], None], every_s: float = 0.5):
    """While the block runs, ``report(done, total)`` the tasks of Spark's active stages, every ``every_s``
    seconds (from the status tracker: what the Spark UI's progress bar shows, without the UI)."""
    import threading

    tracker = spark.sparkContext.statusTracker()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            try:
                stages = [tracker.getStageInfo(i) for i in tracker.getActiveStageIds()]
            except Exception:  # noqa: BLE001 - a JVM going away: the build reports that itself
                return
            stages = [s for s in stages if s is not None]
            if stages:
                report(sum(s.numCompletedTasks for s in stages), sum(s.numTasks for s in stages))

    thread = threading.Thread(target=poll, name="spark-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
