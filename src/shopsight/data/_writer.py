"""Day-partitioned parquet output, written to a staging folder and published in one rename."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shopsight.data.schema import DAY, EVENT_SCHEMA, TS, USER_ID
from shopsight.platform import ShopsightError


class DayPartitionedWriter:
    """Buffer event tables and write them as ``<root>/day=YYYY-MM-DD/part-NNNNN.parquet``.

    Rows are buffered until ``flush_rows`` are held, then each day's rows are sorted by
    (user, time) and written as one file of that day's folder, so memory stays bounded however
    many events pass through. Days are shop-local calendar days in ``timezone``.
    """

    def __init__(self, root: Path, timezone: str, flush_rows: int = 1_000_000) -> None:
        self.root = Path(root)
        self.timezone = timezone
        self.flush_rows = flush_rows
        self.rows_written = 0
        self.files_written = 0
        self.days: set[str] = set()
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.root.mkdir(parents=True, exist_ok=True)

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(table.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA))
        self._buffered += table.num_rows
        if self._buffered >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        local = pc.cast(table.column(TS), pa.timestamp("us", tz=self.timezone))
        day = pc.strftime(local, format="%Y-%m-%d")
        table = table.append_column(DAY, day).sort_by(
            [(DAY, "ascending"), (USER_ID, "ascending"), (TS, "ascending")]
        )
        days = table.column(DAY)
        for value in pc.unique(days).to_pylist():
            part = table.filter(pc.equal(days, value)).drop_columns([DAY])
            folder = self.root / f"{DAY}={value}"
            folder.mkdir(exist_ok=True)
            # Spark reads microseconds, not pandas' default nanoseconds.
            pq.write_table(part, folder / f"part-{self.files_written:05d}.parquet", coerce_timestamps="us")
            self.files_written += 1
            self.rows_written += part.num_rows
            self.days.add(value)

    def close(self) -> None:
        self.flush()


def publish_dir(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging`` so that readers see the old or the new folder, never half."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)


def staging_dir_for(target: Path) -> Path:
    """A fresh staging folder beside ``target`` (same filesystem, so the final rename is atomic)."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    return staging


def check_replaceable(target: Path, marker: str) -> None:
    """Refuse to replace a non-empty folder that this platform did not write (no ``marker`` file)."""
    target = Path(target)
    if target.is_file():
        raise ShopsightError(f"{target} is a file; expected a folder to write into")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).exists():
        raise ShopsightError(
            f"{target} exists and was not written by shopsight (no {marker}); choose another --out"
        )
