"""Readers for event files: Taobao UserBehavior CSV (plain or gzip), SASRec text, parquet.

Every reader checks every row against the contract of :mod:`shopsight.data.schema`. Good rows stream
on as Arrow tables in :data:`EVENT_SCHEMA`, a batch at a time (never the whole file in memory); bad rows
go to a quarantine CSV (source line or row, reason code, detail, raw text) and are counted by reason.
A file that is not of the declared format at all stops at once with an :class:`InputFormatError` that
names the file and what was expected.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

from shopsight.data.schema import BEHAVIORS, EVENT_COLUMNS, EVENT_SCHEMA, ID_COLUMNS, TS
from shopsight.platform import DataSettings, InputFormatError

Format = Literal["auto", "taobao", "sasrec", "parquet"]
FORMATS: tuple[str, ...] = ("auto", "taobao", "sasrec", "parquet")

_EXPECTED = {
    "taobao": "Taobao UserBehavior CSV (no header; user_id,item_id,category_id,behavior,timestamp)",
    "sasrec": "SASRec text ('user item' per line, in time order)",
    "parquet": "parquet events (a file, or a folder partitioned by day)",
}
_TAOBAO_LINE = re.compile(r"^[^,]*,[^,]*,[^,]*,(pv|cart|fav|buy),[^,]*$")
_SASREC_LINE = re.compile(r"^\d+ \d+$")
_ID_PATTERN = r"^[0-9]{1,19}$"
# int64's largest value: a 19-digit id is valid up to here. Equal-length digit strings compare as
# numbers do, so the bound is checked on the text, before any cast could overflow.
_ID_MAX = np.iinfo(np.int64).max
_ID_MAX_TEXT = str(_ID_MAX)
_TS_PATTERN = r"^-?[0-9]{1,12}$"
# Unix seconds a datetime can hold in any timezone (a day's margin at either end). Beyond them a value
# is not seconds at all, typically milliseconds (1511600000000 is 1000x a 2017 time): rejected.
_TS_MIN = int(datetime(1, 1, 2, tzinfo=UTC).timestamp())
_TS_MAX = int(datetime(9999, 12, 31, tzinfo=UTC).timestamp())
_SNIFF_BYTES = 64 * 1024
_SNIFF_LINES = 20

# Reason codes of rejected rows, in the order rows are checked.
WRONG_FIELD_COUNT = "wrong_field_count"
NON_NUMERIC_ID = "non_numeric_id"
MISSING_VALUE = "missing_value"
UNKNOWN_BEHAVIOR = "unknown_behavior"
BAD_TIMESTAMP = "bad_timestamp"
OUT_OF_WINDOW = "out_of_window"
TRUNCATED_INPUT = "truncated_input"  # a compressed file that breaks off: the rest is unreadable


def quarantine_file(folder: Path | str, events_path: Path | str) -> Path:
    """The default quarantine file of an input: ``<folder>/<name>.<hash>.rejected.csv``.

    The hash (of the absolute path) keeps ``a/events.csv`` and ``b/events.csv`` from overwriting each
    other's rejects, while the same input always gets the same file (a re-run replaces it).
    """
    path = Path(events_path)
    digest = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:8]
    return Path(folder) / f"{path.name}.{digest}.rejected.csv"


@dataclass(frozen=True)
class TimeWindow:
    """Accepted event times, ``[start, end)`` in UTC."""

    start: datetime
    end: datetime

    @classmethod
    def from_days(cls, first_day: date, last_day: date, timezone: str) -> TimeWindow:
        """The window from the start of ``first_day`` to the end of ``last_day``, shop-local."""
        tz = ZoneInfo(timezone)
        start = datetime.combine(first_day, time(0), tz)
        end = datetime.combine(last_day + timedelta(days=1), time(0), tz)
        return cls(start=start, end=end)

    @classmethod
    def from_settings(cls, data: DataSettings) -> TimeWindow:
        return cls.from_days(data.window_start, data.window_end, data.timezone)

    def bounds_seconds(self) -> tuple[int, int]:
        return int(self.start.timestamp()), int(self.end.timestamp())

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"


@dataclass
class ReadReport:
    """What a reader saw: rows read, kept and rejected (by reason), and where the rejects went."""

    path: Path
    format: str
    rows_read: int = 0
    rows_good: int = 0
    rejected: Counter = field(default_factory=Counter)
    quarantine_path: Path | None = None
    #: Lines holding nothing but whitespace: not rows (neither read nor rejected), but counted.
    blank_lines: int = 0
    #: One line each, for problems with the file as a whole (e.g. a gzip that breaks off).
    warnings: list[str] = field(default_factory=list)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def notes(self) -> dict[str, str]:
        """Summary lines beyond the row counts: blank lines and warnings, where there are any."""
        notes = {}
        if self.blank_lines:
            notes["blank lines"] = f"{self.blank_lines:,} (skipped, not rows)"
        for i, warning in enumerate(self.warnings):
            notes["warning" if i == 0 else f"warning {i + 1}"] = warning
        return notes


class _Quarantine:
    """Rejected rows, appended to ``<path>.partial`` and renamed into place when the read completes."""

    COLUMNS = ("source_row", "reason", "detail", "raw")

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file = None
        self._writer = None

    def add(self, row: int, reason: str, detail: str, raw: str) -> None:
        if self.path is None:
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._partial, "w", newline="")  # noqa: SIM115 (closed in finish/abort)
            self._writer = csv.writer(self._file)
            self._writer.writerow(self.COLUMNS)
        self._writer.writerow((row, reason, detail, raw))

    @property
    def _partial(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    def finish(self) -> Path | None:
        """Close and publish the file; returns its path, or None when nothing was rejected."""
        if self.path is None:
            return None
        if self._file is None:
            self.path.unlink(missing_ok=True)  # a stale file from an earlier run would mislead
            return None
        self._file.close()
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._partial.unlink(missing_ok=True)


class EventReader:
    """Stream the good events of one file or folder, quarantining the bad rows.

    Iterate to get :class:`pyarrow.Table` batches in :data:`EVENT_SCHEMA`; after (or during) the
    iteration :attr:`report` holds the counts. Iterating a second time reads the file again.

    Args:
        path: the file (``.csv``, ``.csv.gz``, ``.txt``, ``.parquet``) or a day-partitioned folder.
        format: ``taobao``, ``sasrec``, ``parquet`` or ``auto`` (decided from the content).
        window: events outside it are rejected; ``None`` accepts any time. SASRec files carry no
            times (their ``ts`` is the line's order), so the window does not apply to them.
        quarantine: CSV file for rejected rows; ``None`` only counts them.
        batch_rows: about how many rows a batch holds.

    Raises:
        InputFormatError: the file is missing, or not of the format at all.
    """

    def __init__(
        self,
        path: Path | str,
        format: Format = "auto",
        *,
        window: TimeWindow | None = None,
        quarantine: Path | str | None = None,
        batch_rows: int = 1_000_000,
    ) -> None:
        self.path = Path(path)
        if format not in FORMATS:
            raise InputFormatError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
        if not self.path.exists():
            raise InputFormatError(f"{self.path}: no such file or folder")
        self.format = detect_format(self.path) if format == "auto" else format
        _check_format(self.path, self.format)
        self.window = window
        self.quarantine_path = Path(quarantine) if quarantine else None
        self.batch_rows = batch_rows
        self.report = ReadReport(path=self.path, format=self.format)

    def __iter__(self) -> Iterator[pa.Table]:
        self.report = ReadReport(path=self.path, format=self.format)
        quarantine = _Quarantine(self.quarantine_path)
        batches = {"taobao": self._taobao, "sasrec": self._sasrec, "parquet": self._parquet}[self.format]
        try:
            for table in batches(quarantine):
                self.report.rows_good += table.num_rows
                yield table
        except BaseException:
            quarantine.abort()
            raise
        self.report.quarantine_path = quarantine.finish()

    def read_all(self) -> pa.Table:
        """All good rows as one table (for files that fit in memory)."""
        tables = list(self)
        return pa.concat_tables(tables) if tables else EVENT_SCHEMA.empty_table()

    # -- text formats -------------------------------------------------------------------------

    def _text_batches(self, names: list[str], delimiter: str, quarantine: _Quarantine) -> Iterator[tuple]:
        """Yield ``(string record batch, line numbers of its rows)``; wrong field counts are quarantined."""
        # Arrow skips empty lines and numbers rows without them; `stream` notes where they are, and
        # rows the parser rejects (or skips as whitespace-only) are kept in `invalid_lines`.
        stream = _TextStream(self.path)
        invalid_lines: list[int] = []
        expected = len(names)

        def on_invalid(row: pacsv.InvalidRow) -> str:
            invalid_lines.append(row.number)
            if not row.text.strip():
                self.report.blank_lines += 1
                return "skip"
            self.report.rows_read += 1
            self.report.rejected[WRONG_FIELD_COUNT] += 1
            line = int(_skip_lines(np.array([row.number]), stream.blank_lines)[0])
            quarantine.add(
                line, WRONG_FIELD_COUNT, f"{row.actual_columns} fields, expected {expected}", row.text
            )
            return "skip"

        with stream:
            reader = pacsv.open_csv(
                io.BufferedReader(stream, buffer_size=1 << 20),
                read_options=pacsv.ReadOptions(
                    column_names=names, use_threads=False, block_size=_block_size(self.batch_rows)
                ),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
            )
            parsed = 0
            try:
                for batch in reader:
                    first = parsed
                    parsed += batch.num_rows
                    self.report.rows_read += batch.num_rows
                    yield batch, _LineNumbers(first, invalid_lines, stream.blank_lines)
            except pa.ArrowInvalid as exc:
                raise InputFormatError(
                    f"{self.path}: cannot be read as {_EXPECTED[self.format]}: {exc}"
                ) from None
            finally:
                self.report.blank_lines += len(stream.blank_lines)
        if stream.error is not None:
            self._truncated(stream, quarantine)

    def _truncated(self, stream: _TextStream, quarantine: _Quarantine) -> None:
        """Count, quarantine and report a compressed stream that breaks off: one row, one warning."""
        after = stream.lines
        self.report.rows_read += 1
        self.report.rejected[TRUNCATED_INPUT] += 1
        quarantine.add(
            after + 1,
            TRUNCATED_INPUT,
            f"the compressed stream breaks off here ({stream.error}); nothing after it can be read",
            stream.cut_line.decode("utf-8", errors="replace"),
        )
        self.report.warnings.append(
            f"{self.path.name} is truncated or corrupt after line {after:,} ({stream.error}): "
            "the complete rows before it were read, the rest of the file is lost"
        )

    def _taobao(self, quarantine: _Quarantine) -> Iterator[pa.Table]:
        names = [*ID_COLUMNS, "behavior", TS]
        for batch, lines in self._text_batches(names, ",", quarantine):
            columns = {name: batch.column(name) for name in names}
            reasons, details = _check_text_columns(columns, self.window)
            _quarantine_rows(
                quarantine,
                self.report,
                reasons,
                details,
                lines,
                batch,
                ",",
            )
            keep = pa.array(reasons == "")
            ts = pc.cast(pc.cast(pc.filter(columns[TS], keep), pa.int64()), pa.timestamp("s", tz="UTC"))
            yield pa.table(
                [pc.cast(pc.filter(columns[c], keep), pa.int64()) for c in ID_COLUMNS]
                + [pc.filter(columns["behavior"], keep), pc.cast(ts, pa.timestamp("us", tz="UTC"))],
                schema=EVENT_SCHEMA,
            )

    def _sasrec(self, quarantine: _Quarantine) -> Iterator[pa.Table]:
        # SASRec files hold interactions in time order but no times, categories or kinds: each
        # becomes a `pv` of category 0 at "line number seconds after the epoch", which keeps the order.
        names = ["user_id", "item_id"]
        for batch, lines in self._text_batches(names, " ", quarantine):
            columns = {name: batch.column(name) for name in names}
            reasons, details = _check_text_columns(columns, None)
            _quarantine_rows(
                quarantine,
                self.report,
                reasons,
                details,
                lines,
                batch,
                " ",
            )
            keep = reasons == ""
            n = int(keep.sum())
            line_numbers = lines.of(np.flatnonzero(keep))
            yield pa.table(
                [
                    pc.cast(pc.filter(columns["user_id"], pa.array(keep)), pa.int64()),
                    pc.cast(pc.filter(columns["item_id"], pa.array(keep)), pa.int64()),
                    pa.array(np.zeros(n, dtype=np.int64)),
                    pa.array(["pv"] * n, pa.string()),
                    pa.array(line_numbers.astype("datetime64[s]").astype("datetime64[us]")).cast(
                        pa.timestamp("us", tz="UTC")
                    ),
                ],
                schema=EVENT_SCHEMA,
            )

    # -- parquet ------------------------------------------------------------------------------

    def _parquet(self, quarantine: _Quarantine) -> Iterator[pa.Table]:
        try:
            dataset = ds.dataset(
                str(self.path), format="parquet", partitioning="hive", exclude_invalid_files=False
            )
            missing = [c for c in EVENT_COLUMNS if c not in dataset.schema.names]
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputFormatError(f"{self.path}: cannot be read as {_EXPECTED['parquet']}: {exc}") from None
        if missing:
            raise InputFormatError(
                f"{self.path}: parquet events lack column(s) {', '.join(missing)}; "
                f"expected {', '.join(EVENT_COLUMNS)}"
            )
        _check_parquet_types(self.path, dataset.schema)
        row = 0
        for batch in dataset.to_batches(columns=list(EVENT_COLUMNS), batch_size=self.batch_rows):
            if batch.num_rows == 0:
                continue
            self.report.rows_read += batch.num_rows
            reasons, details = _check_typed_columns(batch, self.window)
            start = row
            _quarantine_rows(
                quarantine,
                self.report,
                reasons,
                details,
                _RowNumbers(start),
                batch,
                None,
            )
            row += batch.num_rows
            keep = pa.array(reasons == "")
            kept = batch.filter(keep)
            yield pa.table(
                [pc.cast(kept.column(c), pa.int64()) for c in ID_COLUMNS]
                + [pc.cast(kept.column("behavior"), pa.string()), _to_utc_micros(kept.column(TS))],
                schema=EVENT_SCHEMA,
            )


# -- row checks ---------------------------------------------------------------------------------


class _Rejections:
    """Reason code and detail per row of a batch ('' = good); the first failing check wins."""

    def __init__(self, rows: int) -> None:
        self.reasons = np.full(rows, "", dtype=object)
        self.details = np.full(rows, "", dtype=object)

    def reject(self, bad: np.ndarray, reason: str, detail: str) -> None:
        fresh = bad & (self.reasons == "")
        self.reasons[fresh] = reason
        self.details[fresh] = detail


def _check_text_columns(
    columns: dict[str, pa.Array], window: TimeWindow | None
) -> tuple[np.ndarray, np.ndarray]:
    """Reason code and detail per row ('' = good); the first failing check wins."""
    rejections = _Rejections(len(next(iter(columns.values()))))
    reject = rejections.reject
    for name in ID_COLUMNS:
        if name in columns:
            reject(~_is_id_text(columns[name]), NON_NUMERIC_ID, f"{name} is not a non-negative int64")
    if "behavior" in columns:
        ok = pc.is_in(columns["behavior"], value_set=pa.array(BEHAVIORS)).to_numpy(zero_copy_only=False)
        reject(~ok, UNKNOWN_BEHAVIOR, f"behavior not one of {'/'.join(BEHAVIORS)}")
    if TS in columns:
        numeric = pc.match_substring_regex(columns[TS], _TS_PATTERN).to_numpy(zero_copy_only=False)
        reject(~numeric, BAD_TIMESTAMP, "timestamp is not unix seconds")
        seconds = pc.cast(pc.if_else(pa.array(numeric), columns[TS], "0"), pa.int64()).to_numpy()
        _reject_out_of_range(reject, numeric, seconds)
        if window is not None:
            _reject_outside(reject, numeric, seconds, window)
    return rejections.reasons, rejections.details


def _check_typed_columns(batch: pa.RecordBatch, window: TimeWindow | None) -> tuple[np.ndarray, np.ndarray]:
    rejections = _Rejections(batch.num_rows)
    reject = rejections.reject
    for name in EVENT_COLUMNS:
        reject(batch.column(name).is_null().to_numpy(zero_copy_only=False), MISSING_VALUE, f"{name} is null")
    for name in ID_COLUMNS:
        column = batch.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            reject(~_is_id_text(column), NON_NUMERIC_ID, f"{name} is not a non-negative int64")
        elif pa.types.is_signed_integer(column.type):
            negative = pc.fill_null(pc.less(column, 0), False).to_numpy(zero_copy_only=False)
            reject(negative, NON_NUMERIC_ID, f"{name} is negative")
        elif column.type == pa.uint64():  # the one integer type that holds more than int64
            big = pc.fill_null(pc.greater(column, pa.scalar(_ID_MAX, pa.uint64())), False)
            reject(big.to_numpy(zero_copy_only=False), NON_NUMERIC_ID, f"{name} is beyond int64")
    behavior = pc.cast(batch.column("behavior"), pa.string())
    ok = pc.fill_null(pc.is_in(behavior, value_set=pa.array(BEHAVIORS)), True).to_numpy(zero_copy_only=False)
    reject(~ok, UNKNOWN_BEHAVIOR, f"behavior not one of {'/'.join(BEHAVIORS)}")
    present, seconds = _typed_seconds(batch.column(TS))
    _reject_out_of_range(reject, present, seconds)
    if window is not None:
        _reject_outside(reject, present, seconds, window)
    return rejections.reasons, rejections.details


def _is_id_text(column: pa.Array) -> np.ndarray:
    """Whether each string is a non-negative integer that fits int64 (a null passes: it is missing)."""
    digits = pc.match_substring_regex(column, _ID_PATTERN)
    fits = pc.or_(pc.less(pc.utf8_length(column), len(_ID_MAX_TEXT)), pc.less_equal(column, _ID_MAX_TEXT))
    return pc.fill_null(pc.and_(digits, fits), True).to_numpy(zero_copy_only=False)


def _typed_seconds(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(present, whole unix seconds) of a parquet ``ts`` column (timestamps or integer seconds).

    Computed on the integer values, never through a cast to microseconds, which overflows (and raises
    for the whole batch) on the very values that are to be rejected, such as milliseconds.
    """
    present = column.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_timestamp(column.type):
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[column.type.unit]
        values = pc.fill_null(column.cast(pa.int64()), 0).to_numpy()
        return present, values // per_second
    if column.type == pa.uint64():  # beyond int64 is beyond any time: clip, the range check rejects it
        column = pc.min_element_wise(column, pa.scalar(_ID_MAX, pa.uint64()))
    return present, pc.fill_null(column.cast(pa.int64()), 0).to_numpy()


def _reject_out_of_range(reject, present: np.ndarray, seconds: np.ndarray) -> None:
    bad = present & ((seconds < _TS_MIN) | (seconds > _TS_MAX))
    reject(bad, BAD_TIMESTAMP, "timestamp is not a time in unix seconds (milliseconds?)")


def _reject_outside(reject, present: np.ndarray, seconds: np.ndarray, window: TimeWindow) -> None:
    lo, hi = window.bounds_seconds()
    outside = present & ((seconds < lo) | (seconds >= hi))
    reject(outside, OUT_OF_WINDOW, f"timestamp outside {window}")


def _quarantine_rows(quarantine, report: ReadReport, reasons, details, numbers, batch, separator) -> None:
    """Count and quarantine the rejected rows of a batch; raw text is the line (text) or JSON (parquet)."""
    for i in np.flatnonzero(reasons != ""):
        report.rejected[reasons[i]] += 1
        row = {name: _raw_value(batch.column(name)[int(i)]) for name in batch.schema.names}
        if separator is None:
            raw = json.dumps(row)
        else:
            raw = separator.join("" if v is None else str(v) for v in row.values())
        quarantine.add(int(numbers.of(np.array([i]))[0]), reasons[i], details[i], raw)


class _LineNumbers:
    """Maps a batch's row index to its 1-based file line, skipping lines the parser rejected."""

    def __init__(self, first_parsed: int, invalid_lines: list[int], blank_lines: list[int]) -> None:
        self.first = first_parsed
        self.invalid = sorted(invalid_lines)  # numbered as Arrow does: without the empty lines
        self.blank = list(blank_lines)  # physical line numbers, ascending

    def of(self, rows: np.ndarray) -> np.ndarray:
        lines = self.first + np.asarray(rows, dtype=np.int64) + 1
        return _skip_lines(_skip_lines(lines, self.invalid), self.blank)


def _skip_lines(lines: np.ndarray, skipped_lines: list[int]) -> np.ndarray:
    """Renumber lines counted without ``skipped_lines`` (sorted) as lines counted with them."""
    if not skipped_lines:
        return lines
    skipped_at = np.asarray(skipped_lines, dtype=np.int64)
    # Every skipped line at or before a candidate line pushes it one line further: iterate to the
    # fixed point (at most one pass per skipped line in the way).
    skipped = np.zeros_like(lines)
    while True:
        now = np.searchsorted(skipped_at, lines + skipped, side="right")
        if np.array_equal(now, skipped):
            return lines + skipped
        skipped = now


class _RowNumbers:
    def __init__(self, first: int) -> None:
        self.first = first

    def of(self, rows: np.ndarray) -> np.ndarray:
        return rows + self.first


class _TextStream(io.RawIOBase):
    """The bytes of a text event file, plain or gzip, handed out in complete lines.

    Arrow's gzip codec raises on a truncated or corrupt stream and drops the block it was decoding,
    so every row before the break would be lost. Here a break ends the stream after the last complete
    line instead, and is recorded in :attr:`error`; the cut line is held back in :attr:`cut_line`
    (``1,2,3,pv,15116`` must not pass for a row). On the way, the numbers of empty lines (which Arrow
    skips without a trace) are noted in :attr:`blank_lines`.
    """

    _CHUNK = 1 << 20

    def __init__(self, path: Path) -> None:
        compressed = _is_gzip(path)
        self._raw = gzip.open(path, "rb") if compressed else open(path, "rb")  # noqa: SIM115 (close())
        # What a broken gzip raises; a plain file's I/O errors are real errors and propagate.
        self._breaks = (EOFError, OSError, zlib.error) if compressed else ()
        self._ready = memoryview(b"")
        self._tail = b""  # the bytes after the last newline: a line not complete yet
        self._ended = False
        self.lines = 0  # newline-terminated lines handed out
        self.blank_lines: list[int] = []
        self.error: str | None = None
        self.cut_line = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._ready and not self._ended:
            self._fill()
        n = min(len(buffer), len(self._ready))
        buffer[:n] = self._ready[:n]
        self._ready = self._ready[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()

    def _fill(self) -> None:
        try:
            chunk = self._raw.read1(self._CHUNK)  # one decompression step: no data lost to a raise
        except self._breaks as exc:
            self.error = str(exc) or type(exc).__name__
            self.cut_line, self._tail = self._tail, b""
            self._ended = True
            return
        if chunk:
            data = self._tail + chunk
            cut = data.rfind(b"\n") + 1
            data, self._tail = data[:cut], data[cut:]
        else:  # a clean end: a last line without a newline is complete
            data, self._tail = self._tail, b""
            self._ended = True
        self._note_blank_lines(data)
        self.lines += data.count(b"\n")
        self._ready = memoryview(data)

    def _note_blank_lines(self, data: bytes) -> None:
        # `data` starts at a line start: an empty line is a newline at the start or right after another.
        starts = [0] if data.startswith((b"\n", b"\r\n")) else []
        for pair in (b"\n\n", b"\n\r\n"):
            at = data.find(pair)
            while at != -1:
                starts.append(at + 1)
                at = data.find(pair, at + 1)
        line, counted = self.lines + 1, 0
        for start in sorted(starts):
            line += data.count(b"\n", counted, start)
            counted = start
            self.blank_lines.append(line)


def _to_utc_micros(column: pa.Array) -> pa.Array:
    if pa.types.is_timestamp(column.type):
        if column.type.tz is None:  # naive times are taken as UTC, the contract's zone
            column = pc.assume_timezone(column, "UTC")
        return pc.cast(column, pa.timestamp("us", tz="UTC"))
    # integer unix seconds, of any integer type (Arrow casts only signed ones to timestamps)
    seconds = pc.cast(pc.cast(column, pa.int64()), pa.timestamp("s", tz="UTC"))
    return pc.cast(seconds, pa.timestamp("us", tz="UTC"))


def _raw_value(scalar: pa.Scalar):
    """A value as JSON can hold it: times in ISO format, a time beyond datetime's years as its number."""
    try:
        value = scalar.as_py()
    except (OverflowError, ValueError):  # e.g. milliseconds stored as timestamp[s]
        return scalar.cast(pa.int64()).as_py()
    return value.isoformat() if hasattr(value, "isoformat") else value


def _check_parquet_types(path: Path, schema: pa.Schema) -> None:
    problems = []
    for name in ID_COLUMNS:
        t = schema.field(name).type
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            problems.append(f"{name} is {t}, expected int64")
    t = schema.field("behavior").type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)):
        problems.append(f"behavior is {t}, expected string")
    t = schema.field(TS).type
    if not (pa.types.is_timestamp(t) or pa.types.is_integer(t)):
        problems.append(f"ts is {t}, expected a timestamp or unix seconds")
    if problems:
        raise InputFormatError(f"{path}: parquet events with wrong column types: {'; '.join(problems)}")


def _block_size(batch_rows: int) -> int:
    # A Taobao line is about 40 bytes; pyarrow wants the block size in bytes.
    return max(1 << 16, min(batch_rows * 40, 256 << 20))


# -- format detection -----------------------------------------------------------------------------


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _is_parquet_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _head_text(path: Path) -> str:
    """The first bytes of a text file, decompressed; InputFormatError if it is empty or binary."""
    if path.stat().st_size == 0:
        raise InputFormatError(f"{path}: the file is empty")
    if _is_parquet_file(path):
        raise InputFormatError(f"{path}: this is a parquet file, not text (use --format parquet)")
    try:
        with _TextStream(path) as stream:
            head = io.BufferedReader(stream).read(_SNIFF_BYTES)
    except OSError as exc:
        raise InputFormatError(f"{path}: cannot be read: {exc}") from None
    if not head and stream.error is not None:  # not even one complete line before a gzip breaks off
        raise InputFormatError(f"{path}: cannot be read: {stream.error}")
    if b"\x00" in head:
        raise InputFormatError(f"{path}: this is a binary file, not text")
    text = head.decode("utf-8", errors="replace")
    if "\ufffd" in text[:-4]:  # a multi-byte character cut at the end is fine
        raise InputFormatError(f"{path}: this is not UTF-8 text")
    if not text.strip():
        raise InputFormatError(f"{path}: the file holds no rows")
    return text


def _first_lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()[:-1] or text.splitlines()]
    return [line for line in lines if line][:_SNIFF_LINES]


def detect_format(path: Path) -> str:
    """Decide a file's format from its content: a folder or ``PAR1`` file is parquet, else sniff the text."""
    if path.is_dir() or _is_parquet_file(path):
        return "parquet"
    lines = _first_lines(_head_text(path))
    if any(_TAOBAO_LINE.match(line) for line in lines):
        return "taobao"
    if any(_SASREC_LINE.match(line) for line in lines):
        return "sasrec"
    raise InputFormatError(f"{path}: not an event file; expected one of: {'; '.join(_EXPECTED.values())}")


def _check_format(path: Path, fmt: str) -> None:
    """Stop early when the file is not of the declared format at all."""
    if fmt == "parquet":
        if path.is_file() and not _is_parquet_file(path):
            raise InputFormatError(
                f"{path}: not a parquet file (no PAR1 magic); expected {_EXPECTED['parquet']}"
            )
        if path.is_dir() and not any(p.suffix == ".parquet" for p in path.rglob("*.parquet")):
            raise InputFormatError(
                f"{path}: the folder holds no .parquet files; expected {_EXPECTED['parquet']}"
            )
        return
    if path.is_dir():
        raise InputFormatError(f"{path}: is a folder; expected a file of {_EXPECTED[fmt]}")
    text = _head_text(path)
    stripped = text.lstrip()
    if stripped[:1] in "{[":
        raise InputFormatError(f"{path}: looks like JSON; expected {_EXPECTED[fmt]}")
    pattern = _TAOBAO_LINE if fmt == "taobao" else _SASREC_LINE
    lines = _first_lines(text)
    if not any(pattern.match(line) for line in lines):
        raise InputFormatError(f"{path}: first line {lines[0][:60]!r} is not {_EXPECTED[fmt]}")
