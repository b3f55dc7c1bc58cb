"""The feature build: read and validate events, run the Spark jobs, publish day partitions atomically.

Layout under the output folder (``<data_dir>/features`` by default)::

    user_activity/snapshot_day=YYYY-MM-DD/part-00000.parquet
    user_sequence/...   item_stats/...   category_stats/...   user_segment/...   labels/...
    segment_profile/segment_profile.parquet      (the user portrait of the last build)
    builds.jsonl                                  (one line per build: range, rows, silhouette, rejects)

Writes are idempotent and atomic per day: Spark writes the whole build into a staging folder; only
when every table is complete are the built days swapped in, one rename per partition. Re-running a day
replaces that day's partition and nothing else; a build that fails leaves the previous output as it was.

Builds are reproducible to the byte: the same input gives the same files, wherever and however often it
is built. Nothing in a partition file depends on the run: rows come in a total order (the table's keys
within the day), every column is computed from the events (``created_ts`` too, see :mod:`jobs`), the
segmentation is fitted on its rows in a fixed order, and Spark's files are rewritten by
:func:`_normalise_partition` into one ``part-00000.parquet`` per day whose footer holds nothing of the
writing JVM. A staging folder is named after its builder (pid and start time), so that the next build
can remove those of builds that were killed (SIGKILL, power loss) and leave running ones alone; so is the
folder a day's previous partition is moved to while the new one is swapped in, so that the next build
puts it back where a kill left the day without either.

A build that fails for a reason outside it (the disk full, Spark's JVM or a Python worker of Spark's
killed) says so in one line (a :class:`ShopsightError`), after removing its staging folder; the previous
output is then as it was. Any other failure keeps its traceback: it is a bug.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psutil

from shopsight.data import DayPartitionedWriter, EventReader, TimeWindow, quarantine_file
from shopsight.data.schema import TS, USER_ID
from shopsight.features import jobs
from shopsight.features._spark import spark_session, task_failures_unlogged, task_progress
from shopsight.platform import Settings, ShopsightError, Stopwatch

TABLES = ("user_activity", "user_sequence", "item_stats", "category_stats", "user_segment", "labels")
KEYS = {
    "user_activity": [USER_ID],
    "user_sequence": [USER_ID],
    "item_stats": ["item_id"],
    "category_stats": ["category_id"],
    "user_segment": [USER_ID],
    "labels": [USER_ID],
}
STAGING_PREFIX = ".staging-"
PROFILE = Path("segment_profile") / "segment_profile.parquet"
# Rows per row group of a published file: fixed, so that the file's layout depends on its rows alone.
_ROW_GROUP_ROWS = 64 * 1024
# The writer's settings, spelled out, so that a new default of pyarrow's does not change the bytes.
_PARQUET_OPTIONS = {
    "compression": "snappy",
    "use_dictionary": True,
    "write_statistics": True,
    "version": "2.6",
    "data_page_version": "1.0",
    "store_schema": False,  # no ARROW:schema: the footer holds the Parquet schema, as Spark's did
}


@dataclass
class BuildResult:
    """What a feature build produced."""

    out: Path
    days: list[str]
    rows: dict[str, int]
    events_read: int
    events_rejected: dict[str, int]
    quarantine: Path | None
    silhouette: float | None  # NaN where undefined: fewer than two segments (e.g. a single user)
    seconds: float
    segment_profile: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the reader's, e.g. a truncated gzip


def build_features(
    settings: Settings,
    events_path: Path,
    start: date,
    end: date,
    *,
    out: Path | None = None,
    format: str = "auto",
    on_step: Callable[[str], None] | None = None,
    on_table: Callable[[int, int, str], None] | None = None,
) -> BuildResult:
    """Build every feature table for snapshot days ``start`` .. ``end`` (inclusive).

    Events are read with the data contract's reader (bad rows quarantined under
    ``<data_dir>/quarantine``); history before ``start`` feeds the windows and recency, and the days
    after ``end``, when present, feed the labels (the next one ``buy_next_1d``, the next three
    ``churn_3d``; a label whose days are not all there is unknown, see :func:`jobs.labels`).

    ``on_step(text)`` hears what the build is doing (reading, each table's Spark tasks, publishing);
    ``on_table(done, total, name)`` each table as it starts, and once more when all are written.

    Raises:
        ShopsightError: an empty range, unreadable input, or no events before the end of ``end``; no
            space left on the device, or Spark's JVM or one of its Python workers killed mid-build.
    """
    if end < start:
        raise ShopsightError(f"--end {end} is before --start {start}")
    out = Path(out or settings.data_dir / "features").absolute()
    step = on_step or (lambda _message: None)
    watch = Stopwatch()
    _remove_abandoned_staging(out)
    staging = None
    stage = "staging"  # then "publishing", then "published": what a failure leaves behind
    try:
        staging = _new_staging(out)
        step(f"reading and validating {events_path}")
        quarantine = quarantine_file(settings.data_dir.absolute() / "quarantine", events_path)
        reader = EventReader(
            events_path,
            format,  # type: ignore[arg-type]
            window=TimeWindow.from_settings(settings.data),
            quarantine=quarantine,
            batch_rows=settings.data.batch_rows,
        )
        writer = DayPartitionedWriter(staging / "_events", settings.data.timezone, settings.data.batch_rows)
        for table in reader:
            writer.add(table)
        writer.close()
        if writer.rows_written == 0:
            raise ShopsightError(f"{events_path}: no valid events ({reader.report.rows_rejected:,} rejected)")

        with spark_session(settings) as spark, task_failures_unlogged(spark):
            step("computing features with Spark")
            result = _run_jobs(spark, settings, staging, start, end, step, on_table or (lambda *_: None))
        _write_segment_profile(staging, result["profile"])
        step("publishing partitions")
        stage = "publishing"
        days = _publish(staging, out)
        stage = "published"
        build = BuildResult(
            out=out,
            days=days,
            rows=result["rows"],
            events_read=reader.report.rows_read,
            events_rejected=dict(reader.report.rejected),
            quarantine=reader.report.quarantine_path,
            silhouette=result["silhouette"],
            seconds=watch.seconds,
            segment_profile=result["profile"],
            warnings=list(reader.report.warnings),
        )
        _log_build(out, build, start, end, events_path)
        return build
    except ShopsightError:
        raise
    except Exception as exc:
        problem = _failure_from_outside(exc, settings, out, stage)
        if problem is None:
            raise
        raise problem from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _failure_from_outside(exc: Exception, settings: Settings, out: Path, stage: str) -> ShopsightError | None:
    """``exc`` as one line where its cause is outside the build: the disk full, Spark's JVM or one of its
    Python workers killed. None for anything else.

    Spark reports a full disk as a Java ``IOException`` inside a ``Py4JJavaError``, pyarrow as an
    ``OSError`` (ENOSPC); a killed JVM as a broken or refused connection; a killed Python worker as a
    failed task. Only the text of the Java causes tells these apart.
    """
    chain, seen = [], exc
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(f"{e}\n{getattr(e, '_stackTrace', None) or ''}" for e in chain)
    if stage == "staging":
        left = f"nothing was published: the previous output under {out} is unchanged"
    elif stage == "publishing":
        left = f"publishing stopped part-way under {out}: each day is whole, some are new; build again"
    else:
        left = f"the features are published under {out}; only their line in builds.jsonl is missing"
    full = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain)
    if full or "No space left on device" in text or "Disk quota exceeded" in text:
        folder, free = _fullest(settings, out)
        where = f"{folder} ({free / 1024:,.0f} KiB free)"
        return ShopsightError(f"no space left on device in {where} while building features; {left}")
    # the connection breaks as the JVM dies, often before the process can be reaped: then wait a little
    lost = any(type(e).__name__ == "Py4JNetworkError" or isinstance(e, ConnectionError) for e in chain)
    jvm = _jvm_exit(wait_s=5 if lost else 0)
    if jvm is not None:
        return ShopsightError(f"Spark's JVM exited ({jvm}) while building features; {left}")
    if "Python worker exited unexpectedly" in text:
        return ShopsightError(f"a Python worker of Spark's crashed (killed?) while building features; {left}")
    return None


def _fullest(settings: Settings, out: Path) -> tuple[Path, int]:
    """Of the folders a build writes to (output and staging, quarantine, Spark's scratch space), the one
    with the least free space, and that space in bytes."""
    scratch = settings.spark.conf.get("spark.local.dir") or os.environ.get("SPARK_LOCAL_DIRS")
    folders = [out, settings.data_dir.absolute() / "quarantine"]
    folders += [Path(d) for d in scratch.split(",")] if scratch else [Path(tempfile.gettempdir())]
    free = {}
    for folder in folders:
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None:
            free[folder] = shutil.disk_usage(existing).free
    folder = min(free, key=free.get, default=out)  # the first of equals: the output folder
    return folder, free.get(folder, 0)


def _jvm_exit(wait_s: float = 0) -> str | None:
    """How this process's Spark JVM ended ("killed by SIGKILL", "exit status 1"), waiting up to ``wait_s``
    for it to end; None if it runs (or was never started here)."""
    try:
        from pyspark import SparkContext
    except ImportError:  # pragma: no cover - pyspark is a core dependency
        return None
    process = getattr(SparkContext._gateway, "proc", None)
    if process is None:
        return None
    if wait_s:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait_s)
    if process.poll() is None:
        return None
    code = process.returncode
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _run_jobs(
    spark,
    settings: Settings,
    staging: Path,
    start: date,
    end: date,
    step: Callable[[str], None],
    on_table: Callable[[int, int, str], None],
) -> dict:
    from pyspark.sql import functions as F

    cfg = settings.features
    events = spark.read.parquet(str(staging / "_events")).drop("day")
    days = jobs.snapshot_days(spark, start, end).cache()
    end_ts = jobs.snapshot_days(spark, end, end).first()[jobs.SNAPSHOT_TS]
    first_ts = events.agg(F.min(TS)).first()[0]
    if first_ts is None or first_ts >= end_ts:
        raise ShopsightError(f"no events before the end of {end}: nothing to build")
    # Features see only events before the last snapshot; labels also see the days after it.
    past = events.filter(F.col(TS) < F.lit(end_ts)).cache()
    label_events = events.filter(F.col(TS) < F.lit(end_ts + timedelta(days=jobs.LABEL_HORIZON_DAYS)))

    activity = jobs.user_activity(past, days, cfg.windows, cfg.session_gap_minutes).cache()
    segments, profile, silhouette = jobs.user_segments(activity, cfg.segments, cfg.windows)
    tables = {
        "user_activity": activity,
        "user_sequence": jobs.user_sequence(past, days, cfg.sequence_length),
        "item_stats": jobs.item_stats(past, days, cfg.windows),
        "category_stats": jobs.category_stats(past, days, cfg.windows),
        "user_segment": segments,
        "labels": jobs.labels(label_events, days),
    }
    snapshot_days = [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]
    rows = {}
    # each table is one Spark job over every snapshot day: its progress is the job's tasks
    doing = {"table": ""}
    with task_progress(spark, lambda done, total: step(f"{doing['table']}: Spark tasks {done:,}/{total:,}")):
        for number, (name, frame) in enumerate(tables.items()):
            doing["table"] = f"{name} ({len(snapshot_days)} snapshot days)"
            on_table(number, len(tables), name)
            rows[name] = _write_table(frame, staging / name, KEYS[name], snapshot_days)
    on_table(len(tables), len(tables), "")
    return {"rows": rows, "profile": profile, "silhouette": silhouette}


def _write_table(frame, path: Path, keys: list[str], snapshot_days: list[str]) -> int:
    """One table's partitions, a file per snapshot day; returns its rows."""
    # One task per day (so one file per day), its rows sorted by day then keys: the order the
    # partitioned writer needs, so Spark adds no sort of its own, and a total order within the
    # day (the keys are unique there), so no tie is left in the order the shuffle delivered.
    (
        frame.repartition(jobs.SNAPSHOT_DAY)
        .sortWithinPartitions(jobs.SNAPSHOT_DAY, *keys)
        .write.mode("overwrite")
        .option("maxRecordsPerFile", 0)  # never split a day into several files
        .partitionBy(jobs.SNAPSHOT_DAY)
        .parquet(str(path))
    )
    # Spark writes no partition for a day without rows (the labels of the last observed day have
    # none), and a table without files cannot even be read back (UNABLE_TO_INFER_SCHEMA). An empty
    # file keeps the day's partition and its schema: readers get a typed empty day, and a re-run
    # replaces the day's earlier rows, as for any other day.
    for day in snapshot_days:
        partition = path / f"{jobs.SNAPSHOT_DAY}={day}"
        if not partition.exists():
            frame.drop(jobs.SNAPSHOT_DAY).limit(0).coalesce(1).write.parquet(str(partition))
    return sum(_normalise_partition(partition) for partition in sorted(path.glob(f"{jobs.SNAPSHOT_DAY}=*")))


def _normalise_partition(folder: Path) -> int:
    """Rewrite Spark's files of one day as ``part-00000.parquet``, whose bytes depend on the rows alone.

    Spark's own files differ from run to run with the same rows: their names hold a random uuid, and
    parquet-mr lists each column chunk's encodings in a HashSet's order, that is by the enum constants'
    identity hashes, which change from one JVM to the next (this alone changed every file's sha256).
    Its key-value metadata (``org.apache.spark.version``, the Spark schema) also changes with an upgrade
    of Spark. pyarrow writes the same rows to the same bytes: the rows are copied as they are, in
    Spark's order, into fixed-size row groups; the footer keeps the Parquet schema and no metadata.
    The checksums (``.*.crc``) and ``_SUCCESS`` markers Spark leaves beside them go too.

    Returns the number of rows.
    """
    import pyarrow.parquet as pq

    # One task wrote the day (see _run_jobs), so its files (if it ever wrote several) are named alike
    # but for their counter: name order is the order it wrote them in.
    parts = sorted(folder.glob("part-*.parquet"))
    target = folder / "part-00000.parquet"  # Spark's names all hold a uuid: no clash with this one
    schema = pq.read_schema(parts[0]).remove_metadata()
    rows = 0
    with pq.ParquetWriter(target, schema, **_PARQUET_OPTIONS) as writer:
        for group in _row_groups(parts, schema):
            writer.write_table(group)
            rows += group.num_rows
    for leftover in folder.iterdir():
        if leftover != target:
            leftover.unlink()
    return rows


def _row_groups(parts: list[Path], schema) -> Iterator:
    """The rows of ``parts``, in order, as tables of ``_ROW_GROUP_ROWS`` rows (the last one fewer).

    Regrouped, and each group's columns made contiguous, so that neither the row groups nor the pages
    within them (cut as values are fed in) follow how Spark happened to group the rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    pending = schema.empty_table()
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(batch_size=_ROW_GROUP_ROWS):
            pending = pa.concat_tables([pending, pa.Table.from_batches([batch]).cast(schema)])
            while pending.num_rows >= _ROW_GROUP_ROWS:
                yield pending.slice(0, _ROW_GROUP_ROWS).combine_chunks()
                pending = pending.slice(_ROW_GROUP_ROWS)
    if pending.num_rows:
        yield pending.combine_chunks()


def _new_staging(out: Path) -> Path:
    """A fresh staging folder under ``out``, named after this process: its pid and start time.

    The name is the record: it exists as soon as the folder does (one mkdir), so no other build can
    see the folder without its builder. The start time tells this process from a later one that got
    the same pid. Pids are a machine's own: builds that share an output folder run on one machine.
    """
    staging = out / f"{STAGING_PREFIX}{_builder()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    return staging


def _builder() -> str:
    """``<pid>-<start time>`` of this process: what names its staging and replaced-partition folders."""
    me = psutil.Process()
    return f"{me.pid}-{_start_time(me)}"


def _start_time(process: psutil.Process) -> int:
    # in hundredths of a second, the kernel's clock ticks: the same value every time it is read
    return round(process.create_time() * 100)


def _remove_abandoned_staging(out: Path) -> None:
    """Remove what builds that no longer run (killed before their cleanup ran) left under ``out``.

    Their staging folders go. A day's previous partition that such a build had moved aside
    (``<table>/.snapshot_day=D.old-<pid>-<start>-<id>``) goes too, unless the build was killed before
    the new partition took its place: then it is put back, and the day is as it was before that build.
    """
    for folder in out.glob(f"{STAGING_PREFIX}*"):
        owner = re.fullmatch(rf"{re.escape(STAGING_PREFIX)}(\d+-\d+)-[0-9a-f]+", folder.name)
        # A name without its builder (``.staging-<hex>``) is an earlier version's: that build has ended.
        if owner is None or not _builder_running(owner[1]):
            shutil.rmtree(folder, ignore_errors=True)
    for name in TABLES:
        for moved in (out / name).glob(f".{jobs.SNAPSHOT_DAY}=*.old-*"):
            owner = re.fullmatch(r"\.(.+)\.old-(?:(\d+-\d+)-)?[0-9a-f]+", moved.name)
            if owner is None or (owner[2] is not None and _builder_running(owner[2])):
                continue
            partition = moved.parent / owner[1]
            if partition.exists():
                shutil.rmtree(moved, ignore_errors=True)
            else:
                os.replace(moved, partition)


def _builder_running(builder: str) -> bool:
    """Whether the process named by ``<pid>-<start time>`` still runs."""
    pid, started = (int(part) for part in builder.split("-"))
    try:
        return _start_time(psutil.Process(pid)) == started
    except psutil.NoSuchProcess:  # a zombie included: it has exited
        return False
    except psutil.AccessDenied:  # cannot tell: keep the folder rather than break a running build
        return True


def _publish(staging: Path, out: Path) -> list[str]:
    """Swap each staged day partition into place: one rename each, other days untouched; then the
    segment profile. Nothing is written here, so a full disk cannot stop it half-way."""
    days: set[str] = set()
    builder = _builder()
    for name in TABLES:
        staged_table = staging / name
        target_table = out / name
        target_table.mkdir(parents=True, exist_ok=True)
        for staged in sorted(staged_table.glob(f"{jobs.SNAPSHOT_DAY}=*")):
            target = target_table / staged.name
            # named after this build: if it is killed before the next rename, the next build puts it back
            trash = target_table / f".{staged.name}.old-{builder}-{uuid.uuid4().hex[:8]}"
            if target.exists():
                os.replace(target, trash)
            os.replace(staged, target)
            shutil.rmtree(trash, ignore_errors=True)
            days.add(staged.name.split("=", 1)[1])
    (out / PROFILE).parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging / PROFILE, out / PROFILE)
    return sorted(days)


def _write_segment_profile(staging: Path, profile: list[dict]) -> None:
    """Stage the segment profile: written with the tables, before anything is published."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (staging / PROFILE).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(profile), staging / PROFILE)


def _log_build(out: Path, build: BuildResult, start: date, end: date, events_path: Path) -> None:
    entry = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "events": str(events_path),
        "start": start.isoformat(),
        "end": end.isoformat(),
        "rows": build.rows,
        "events_read": build.events_read,
        "events_rejected": build.events_rejected,
        "silhouette": None if build.silhouette is None or math.isnan(build.silhouette) else build.silhouette,
        "warnings": build.warnings,
        "seconds": round(build.seconds, 1),
    }
    with (out / "builds.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
