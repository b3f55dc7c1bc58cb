"""The prediction log: every served answer, with the features it used, kept for the monitor.

The request path only appends: a replica packs a batch's records with MessagePack and writes them to
its own *spool segment* (``<data_dir>/predictions/spool/<host>-<pid>-<n>.msgpack``) in one ``write``
call before the answers leave the replica. The bytes are then in the operating system's page cache, so
they outlive the replica: a killed replica (SIGKILL, out of memory) loses no record of an answer it gave.
No thread, queue or buffer sits between the answer and the file, because whatever sits there dies with
the process.

A background thread *rolls* the spool every ``roll_interval_s``: it starts a new segment, and a converter
process of the replica's own (:mod:`shopsight.serving._spool_converter`, at a lower CPU priority, so the
conversion never holds the replica's interpreter lock while requests wait) converts the closed ones to
parquet (``<destination>/task=<task>/date=<YYYY-MM-DD>/<segment>.parquet``, written to a
temporary name and renamed, so readers never see half a file) and deletes them. A writer holds an
exclusive ``flock`` on its open segment; a segment nobody holds belongs to a dead replica, and the next
roll of any replica on the host (or ``shopsight monitor``) converts it too. A roll killed between the
parquet and the delete converts the segment again to the same file name: no record is counted twice.
The last record of a replica killed in the middle of its write may be cut; it is dropped (its answer
never left the replica).

A write the disk refuses (full, over quota) never fails the answer: serving goes on. The segment is cut
back to its last whole record, and the batch waits in memory (up to ``max_waiting_bytes``, 16 MiB by
default) to be written first by the next write or roll, once there is room again. Beyond that limit new
batches are dropped and counted (``records_dropped``), and the log says so once per episode.

The destination is a folder, or an object-store URI (``s3://bucket/prefix``) on clusters, written through
pyarrow's filesystems. Records are one row per user answered (a propensity request for 10 users is 10
rows); a shadow challenger's answers are rows of their own with the alias ``shadow`` and the request's id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import msgpack
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("shopsight.serving.prediction_log")

SPOOL = "spool"
SEGMENT_SUFFIX = ".msgpack"
# the columns of a record, in the order a spool record packs them
FIELDS = (
    "request_id",
    "time",  # when the answer was made: UTC, microseconds since the epoch in the spool
    "team",
    "task",
    "model",
    "version",
    "alias",  # champion | canary | shadow
    "user_id",
    "as_of",  # the time the features were read as of (the answer's as_of)
    "features",  # feature name -> value used (JSON text in parquet)
    "items",  # ranking answers: the items, best first
    "scores",
    "probability",  # probability answers
    "source",  # model | popularity | model_prior | no_history
    "features_unavailable",
    "latency_ms",  # the replica's time for the batch the request was in
)
SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("time", pa.timestamp("us", tz="UTC")),
        pa.field("team", pa.string()),
        pa.field("task", pa.string()),
        pa.field("model", pa.string()),
        pa.field("version", pa.string()),
        pa.field("alias", pa.string()),
        pa.field("user_id", pa.int64()),
        pa.field("as_of", pa.timestamp("us", tz="UTC")),
        pa.field("features", pa.string()),
        pa.field("items", pa.list_(pa.int64())),
        pa.field("scores", pa.list_(pa.float64())),
        pa.field("probability", pa.float64()),
        pa.field("source", pa.string()),
        pa.field("features_unavailable", pa.bool_()),
        pa.field("latency_ms", pa.float64()),
    ]
)
_TIMES = ("time", "as_of")


@dataclass(frozen=True)
class RequestContext:
    """What the ingress knows of a request and the model replica does not: its id and the team."""

    request_id: str
    team: str


def new_request_id() -> str:
    return uuid.uuid4().hex


def micros(moment: datetime) -> int:
    """Microseconds since the epoch, UTC (a naive time is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def _plain(value):
    """What MessagePack cannot pack as it is: numpy scalars and arrays, times."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"cannot log a value of type {type(value).__name__}")


class PredictionLog:
    """A replica's prediction log: :meth:`write` on the request path, rolls in the background.

    Args:
        spool_dir: the host's spool folder (local disk).
        destination: where rolled parquet files go: a folder or a URI pyarrow opens (``s3://...``).
        roll_interval_s: how often the background thread rolls (0: only :meth:`roll` and :meth:`close`).
        filesystem: the destination's filesystem, when the URI alone does not say how to reach it (an
            object store's endpoint and credentials).
        max_waiting_bytes: how much of what the disk refused is kept in memory for the next write.
    """

    def __init__(
        self,
        spool_dir: Path | str,
        destination: str | Path,
        roll_interval_s: float = 60.0,
        filesystem: pafs.FileSystem | None = None,
        max_waiting_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.destination = str(destination)
        self.filesystem = filesystem
        self._prefix = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._numbers = itertools.count()
        self._lock = threading.Lock()  # a write and a segment switch never interleave
        self._fd = self._open_segment()
        self.records_written = 0
        self.records_dropped = 0  # refused by the disk with the waiting room full: not in the log
        self.max_waiting_bytes = max_waiting_bytes
        self._waiting: list[tuple[bytes, int]] = []  # (payload, records) the disk refused, oldest first
        self._refused: OSError | None = None  # set while the disk refuses writes
        self._converter = _Converter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if roll_interval_s > 0:
            self._thread = threading.Thread(
                target=self._roll_every, args=(roll_interval_s,), name="prediction-log-roll", daemon=True
            )
            self._thread.start()

    def _open_segment(self) -> int:
        path = self.spool_dir / f"{self._prefix}-{next(self._numbers):06d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while open: a segment without a holder is a dead writer's
        self._path = path
        return fd

    def write(self, records: Sequence[tuple]) -> None:
        """Append records (tuples in :data:`FIELDS` order) to the open segment, in one write."""
        if not records:
            return
        payload = b"".join(msgpack.packb(record, default=_plain) for record in records)
        with self._lock:
            if self._refused is not None and self.waiting_bytes + len(payload) > self.max_waiting_bytes:
                self._write_waiting()  # room again, perhaps: what waits goes first
                if self._refused is not None:
                    self.records_dropped += len(records)
                    return
            self._waiting.append((payload, len(records)))
            self._write_waiting()

    @property
    def waiting_bytes(self) -> int:
        return sum(len(payload) for payload, _ in self._waiting)

    @property
    def records_waiting(self) -> int:
        return sum(n for _, n in self._waiting)

    def _write_waiting(self) -> None:
        """Append what waits, in one write (under ``_lock``); on a refusal keep it waiting and cut the segment
        back to its last whole record (a full disk may take part of a write)."""
        if not self._waiting or self._fd is None:
            return
        data = b"".join(payload for payload, _ in self._waiting)
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                why = f"{os.strerror(errno.ENOSPC)}: wrote {written} of {len(data)} bytes"
                raise OSError(errno.ENOSPC, why)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            if self._refused is None:
                log.warning(
                    "the prediction log's spool %s refuses writes (%s): serving goes on, up to %d KiB of "
                    "records wait in memory", self._path, exc, self.max_waiting_bytes >> 10,
                )  # fmt: skip
            self._refused = exc
            return
        self.records_written += sum(n for _, n in self._waiting)
        if self._refused is not None:
            log.warning("the prediction log's spool takes writes again; %d records were dropped meanwhile",
                        self.records_dropped)  # fmt: skip
            self._refused = None
        self._waiting.clear()

    def roll(self) -> int:
        """Start a new segment and convert every closed one of the host to parquet; returns the records
        converted."""
        with self._lock:
            self._write_waiting()
            if self._fd is not None and os.fstat(self._fd).st_size > 0:
                old = self._fd
                self._fd = self._open_segment()
                os.close(old)  # releases its lock: the segment is closed
        return self._converter.collect(self.spool_dir, self.destination, self.filesystem)

    def close(self) -> None:
        """Stop rolling, close the segment and convert it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            self._write_waiting()
            if self._waiting:
                log.error("the prediction log closes with %d records the disk refused: they are lost",
                          self.records_waiting)  # fmt: skip
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self._converter.close()
        collect(self.spool_dir, self.destination, self.filesystem)  # serving is over: in this process

    def roll_or_warn(self) -> None:
        """:meth:`roll`, logging a failure instead of raising it: the next roll retries."""
        try:
            self.roll()
        except Exception:  # noqa: BLE001 - serving goes on
            log.exception("rolling the prediction log failed; the next roll retries")

    def _roll_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.roll_or_warn()


class _Converter:
    """The replica's converter process (:mod:`shopsight.serving._spool_converter`), started at the first
    roll and again after it dies; one job at a time (the roll thread holds it)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def collect(self, spool_dir: Path, destination: str, filesystem: pafs.FileSystem | None) -> int:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "shopsight.serving._spool_converter"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                )  # fmt: skip
            try:
                pickle.dump((str(spool_dir), destination, filesystem), self._process.stdin)
                self._process.stdin.flush()
                line = self._process.stdout.readline()
            except (BrokenPipeError, OSError) as exc:
                raise RuntimeError(f"the prediction log's converter process failed: {exc}") from exc
            if not line:
                code = self._process.wait(timeout=10)
                raise RuntimeError(f"the prediction log's converter process ended (exit code {code})")
            answer = json.loads(line)
            if "error" in answer:
                raise RuntimeError(f"converting the prediction log's spool failed: {answer['error']}")
            return int(answer["converted"])

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                self._process.stdin.close()  # the converter ends at the end of its input
                try:
                    self._process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
                self._process.stdout.close()
                self._process = None


def collect(spool_dir: Path | str, destination: str, filesystem: pafs.FileSystem | None = None) -> int:
    """Convert every closed spool segment under ``spool_dir`` (no writer holds it) to parquet under
    ``destination``, then delete it; returns the records converted."""
    converted = 0
    for path in sorted(Path(spool_dir).glob(f"*{SEGMENT_SUFFIX}")):
        with _closed(path) as records:
            if records is None:  # a live writer holds it, or another roll took it
                continue
            if records:
                _write_parquet(path.stem, records, destination, filesystem)
            converted += len(records)
            path.unlink()
    return converted


@contextlib.contextmanager
def _closed(path: Path) -> Iterator[list[tuple] | None]:
    """The records of a segment no writer holds (locked for the caller meanwhile), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        if not path.exists():  # converted and deleted by another roll between the open and the lock
            yield None
            return
        with os.fdopen(os.dup(fd), "rb") as file:
            yield read_segment(file.read(), path)
    finally:
        os.close(fd)


def read_segment(data: bytes, path: Path | str = "") -> list[tuple]:
    """The whole records of a segment; a record cut by a kill in the middle of its write is dropped."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    records = []
    try:
        for record in unpacker:
            records.append(tuple(record))
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, ValueError):
        log.warning("%s: a cut record at its end was dropped", path)
    return records


def records_table(records: Iterable[tuple]) -> pa.Table:
    """Spool records as a table of :data:`SCHEMA`."""
    columns = list(zip(*records, strict=True)) or [() for _ in FIELDS]
    arrays = {}
    for name, values in zip(FIELDS, columns, strict=True):
        if name in _TIMES:
            arrays[name] = pa.array(values, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        elif name == "features":
            arrays[name] = pa.array([json.dumps(v, separators=(",", ":")) for v in values], pa.string())
        else:
            arrays[name] = pa.array(values, SCHEMA.field(name).type)
    return pa.table(arrays, schema=SCHEMA)


def _write_parquet(name: str, records: list[tuple], destination: str, filesystem) -> None:
    table = records_table(records)
    fs, root = _filesystem(destination, filesystem)
    task_index, time_index = FIELDS.index("task"), FIELDS.index("time")
    groups: dict[tuple[str, str], list[int]] = {}
    for row, record in enumerate(records):
        day = datetime.fromtimestamp(record[time_index] / 1e6, UTC).date().isoformat()
        groups.setdefault((record[task_index], day), []).append(row)
    for (task, day), rows in groups.items():
        folder = f"{root}/task={task}/date={day}"
        fs.create_dir(folder, recursive=True)
        final, temporary = f"{folder}/{name}.parquet", f"{folder}/.{name}.parquet.tmp"
        pq.write_table(table.take(rows), temporary, filesystem=fs, coerce_timestamps="us")
        fs.move(temporary, final)


def _filesystem(destination: str, filesystem) -> tuple[pafs.FileSystem, str]:
    if filesystem is not None:
        return filesystem, destination.split("://", 1)[-1].rstrip("/")
    if "://" in destination:
        fs, root = pafs.FileSystem.from_uri(destination)
        return fs, root.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(destination).absolute())


def read_predictions(
    destination: str | Path,
    start: datetime | None = None,
    end: datetime | None = None,
    tasks: Sequence[str] | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> pa.Table:
    """The rolled records answered in ``[start, end)`` (aware times), of ``tasks`` (default: all)."""
    import pyarrow.dataset as ds

    fs, root = _filesystem(str(destination), filesystem)
    first = start.astimezone(UTC).date().isoformat() if start else ""
    last = end.astimezone(UTC).date().isoformat() if end else "9999"
    files = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        parts = info.path[len(root) :].strip("/").split("/")
        if info.type != pafs.FileType.File or len(parts) != 3 or parts[2].startswith("."):
            continue
        task, day = parts[0].removeprefix("task="), parts[1].removeprefix("date=")
        if (tasks and task not in tasks) or not first <= day <= last:
            continue
        files.append(info.path)
    if not files:
        return SCHEMA.empty_table()
    condition = None
    for part in (
        ds.field("time") >= pa.scalar(start, pa.timestamp("us", tz="UTC")) if start else None,
        ds.field("time") < pa.scalar(end, pa.timestamp("us", tz="UTC")) if end else None,
    ):
        if part is not None:
            condition = part if condition is None else condition & part
    dataset = ds.dataset(sorted(files), schema=SCHEMA, format="parquet", filesystem=fs)
    return dataset.to_table(filter=condition)


def prediction_log_destination(settings) -> tuple[str, pafs.FileSystem | None]:
    """Where the settings put the rolled files, and the filesystem to reach an object store's endpoint."""
    path = settings.serving.prediction_log_path or str(Path(settings.data_dir).absolute() / "predictions")
    endpoint = settings.object_store.endpoint_url
    if path.startswith("s3://") and endpoint:
        return path, pafs.S3FileSystem(endpoint_override=endpoint)
    return path, None


def log_answers(
    log: PredictionLog,
    task: str,
    model: str,
    outcomes: Sequence,
    contexts: Sequence[RequestContext | None],
    latency_ms: float,
) -> None:
    """Write the records of a batch's outcomes (those a predictor filled ``answered`` in), then drop the
    features from the outcomes: they stay in the replica."""
    now = time.time_ns() // 1000
    records = []
    for outcome, context in zip(outcomes, contexts, strict=True):
        answered = outcome.answered
        if not answered:
            continue
        request_id, team = (context.request_id, context.team) if context else (new_request_id(), "-")
        as_of = micros(outcome.as_of) if outcome.as_of else now
        for a in answered:
            records.append(
                (request_id, now, team, task, model, a.version, a.alias, a.user_id, as_of, a.features,
                 a.items, a.scores, a.probability, a.source, outcome.features_unavailable, latency_ms)
            )  # fmt: skip
        outcome.answered = None
    log.write(records)


def answer_logged(
    predictor,
    task: str,
    log: PredictionLog | None,
    requests: Sequence,
    contexts: Sequence[RequestContext | None],
) -> list:
    """``predictor.answer(requests)``, logged (before the answers leave the process) while its
    ``log_answers`` is on."""
    started = time.perf_counter()
    outcomes = predictor.answer(requests)
    if predictor.log_answers and log is not None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        log_answers(log, task, predictor.registered_name, outcomes, contexts, elapsed_ms)
    return outcomes
