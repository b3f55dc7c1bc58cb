"""The console keeps what a user acts on; what the engines say goes to a log file.

Spark's JVM prints its log4j banner and native-library warnings, Ray its start-up and shutdown lines,
Feast and MLflow their own progress, Python libraries their deprecation warnings. None of that is for the
user of a command, and all of it is for whoever debugs one. So a command run from the shell (``main``)
sends the process's standard output and error, file descriptors 1 and 2, to
``<data_dir>/logs/shopsight.log`` as soon as it knows its data directory: what the JVM and any other
child process writes, and every Python ``print``, warning and log record of a library, lands there.
Shopsight's own two consoles (results on stdout, progress and errors on stderr) keep the terminal.

``-v`` leaves the streams alone: everything shows, as without this module. In a Ray job the driver's
output is the job's log, which is read with ``jobs logs``, so it is left alone too.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from shopsight.platform._console import console, err_console

LOG_FILE = Path("logs") / "shopsight.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Output:
    wanted = False  # set by the command line's entry point; an embedding process keeps its streams
    verbose = False
    log_file: Path | None = None
    terminal: tuple[TextIO, TextIO] | None = None


def quiet_console() -> None:
    """Called by the ``shopsight`` entry point: capture the engines' output once the data directory is
    known (:func:`capture_engine_output`). Python's warnings become log records."""
    _Output.wanted = True
    # MLflow prints a "View run ... at" line of its own after every run (ours says where the run is)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.captureWarnings(True)
    logging.getLogger().setLevel(logging.INFO)


def show_engine_output() -> None:
    """``-v``: leave the streams to the engines, and show the log records of every library on stderr."""
    _Output.wanted, _Output.verbose = False, True
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


def engine_output_shown() -> bool:
    """Whether the engines' output reaches the console (``-v``, a Ray job, or a process other than the
    ``shopsight`` command): only then does a Ray driver forward what its workers print besides."""
    return _Output.terminal is None


def log_file() -> Path | None:
    """The log file the engines' output goes to, once captured."""
    return _Output.log_file


def capture_engine_output(data_dir: Path) -> Path | None:
    """Send file descriptors 1 and 2 to ``<data_dir>/logs/shopsight.log``, keeping the consoles on the
    terminal. Once per process, and only where :func:`quiet_console` asked for it and this is no Ray job.
    Returns the log file, or None where the streams are left alone."""
    in_ray_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray for a submitted job's entrypoint
    if not _Output.wanted or _Output.terminal is not None or in_ray_job:
        return _Output.log_file
    path = (data_dir / LOG_FILE).absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:  # a read-only data directory: the engines keep talking to the console
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = tuple(
        os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace", closefd=True)
        for fd in (1, 2)
    )
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    os.close(log_fd)
    # the consoles write to the terminal's copies; sys.stdout and sys.stderr are now the log's
    console.file, err_console.file = terminal
    _Output.terminal, _Output.log_file = terminal, path
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger().addHandler(handler)
    return path


def release_console() -> None:
    """Give file descriptors 1 and 2 back to the terminal (for an error that click or Python prints).
    Child processes started meanwhile keep writing to the log."""
    if _Output.terminal is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, stream in zip((1, 2), _Output.terminal, strict=True):
        stream.flush()
        os.dup2(stream.fileno(), fd)
    console.file = err_console.file = None  # type: ignore[assignment] - back to sys.stdout/sys.stderr
    _Output.terminal = None
