"""The feature build: read and validate events, run the Spark jobs, publish day partitions atomically.

Layout under the output folder (``<data_dir>/features`` by default)::

    user_activity/snapshot_day=YYYY-MM-DD/part-00000.parquet
    user_sequence/...   item_stats/...   category_stats/...   user_segment/...   labels/...
    segment_profile/segment_profile.parquet      (the user portrait of the last build)
    builds.jsonl                                  (one line per build: range, rows, silhouette, rejects)

Writes are idempotent and atomic per day: Spark writes the whole build into a staging folder; only
when every table is complete are the built days swapped in, one rename per partition. Re-running a day
replaces that day's partition and nothing else; a build that fails leaves the previous output as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from shopsight.data import DayPartitionedWriter, EventReader, TimeWindow, quarantine_file
from shopsight.data.schema import TS, USER_ID
from shopsight.features import jobs
from shopsight.features._spark import spark_session
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
) -> BuildResult:
    """Build every feature table for snapshot days ``start`` .. ``end`` (inclusive).

    Events are read with the data contract's reader (bad rows quarantined under
    ``<data_dir>/quarantine``); history before ``start`` feeds the windows and recency, and the days
    after ``end``, when present, feed the labels (the next one ``buy_next_1d``, the next three
    ``churn_3d``; a label whose days are not all there is unknown, see :func:`jobs.labels`).

    Raises:
        ShopsightError: an empty range, unreadable input, or no events before the end of ``end``.
    """
    if end < start:
        raise ShopsightError(f"--end {end} is before --start {start}")
    out = Path(out or settings.data_dir / "features").absolute()
    step = on_step or (lambda _message: None)
    watch = Stopwatch()
    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
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

        with spark_session(settings) as spark:
            step("computing features with Spark")
            result = _run_jobs(spark, settings, staging, start, end)
        step("publishing partitions")
        days = _publish(staging, out)
        _write_segment_profile(out, result["profile"])
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
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_jobs(spark, settings: Settings, staging: Path, start: date, end: date) -> dict:
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
    for name, frame in tables.items():
        path = staging / name
        (
            frame.repartition(jobs.SNAPSHOT_DAY)
            .sortWithinPartitions(*KEYS[name])
            .write.mode("overwrite")
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
                (partition / "_SUCCESS").unlink(missing_ok=True)  # the table's own marker is enough
        rows[name] = spark.read.parquet(str(path)).count()
    return {"rows": rows, "profile": profile, "silhouette": silhouette}


def _publish(staging: Path, out: Path) -> list[str]:
    """Swap each staged day partition into place: one rename each, other days untouched."""
    days: set[str] = set()
    for name in TABLES:
        staged_table = staging / name
        target_table = out / name
        target_table.mkdir(parents=True, exist_ok=True)
        for staged in sorted(staged_table.glob(f"{jobs.SNAPSHOT_DAY}=*")):
            # Spark names files part-<task>-<uuid>; fixed names make re-runs byte-identical.
            for stray in staged.glob(".*.crc"):
                stray.unlink()
            for index, part in enumerate(sorted(staged.glob("part-*.parquet"))):
                part.rename(staged / f"part-{index:05d}.parquet")
            target = target_table / staged.name
            trash = target_table / f".{staged.name}.old-{uuid.uuid4().hex[:8]}"
            if target.exists():
                os.replace(target, trash)
            os.replace(staged, target)
            shutil.rmtree(trash, ignore_errors=True)
            days.add(staged.name.split("=", 1)[1])
    return sorted(days)


def _write_segment_profile(out: Path, profile: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = out / "segment_profile"
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "segment_profile.parquet.partial"
    pq.write_table(pa.Table.from_pylist(profile), partial)
    os.replace(partial, folder / "segment_profile.parquet")


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
