"""The MLflow tracking server of a profile.

``local`` (``mlflow.tracking_uri`` unset): a server this machine runs for the data directory, with a SQL
backend (``mlflow.backend_store_uri``; SQLite at ``<data_dir>/mlflow/mlflow.db`` by default) and an artifact
root it serves to clients (``mlflow.artifact_root``; ``<data_dir>/mlflow/artifacts`` by default), on
``mlflow.host``:``mlflow.port``. ``shopsight mlflow up`` starts it, and commands that need it start it on
first use; it outlives the command and is recorded in ``<data_dir>/mlflow/server.json``. A server counts as
this data directory's only while the recorded process (same pid, same start time) still runs in
``<data_dir>/mlflow`` and answers: another data directory's server, or anything else, on the same port is
never taken for it, and a configured port that something else holds is replaced by a free one.
``cluster`` (``mlflow.tracking_uri`` set): the shared server at that URI, run by its deployment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shopsight.platform._errors import ShopsightError
from shopsight.platform._settings import Settings

_START_TIMEOUT_S = 90
_started_here: list[Settings] = []  # the servers this process started (stopped if its command fails)
_SQL_BACKENDS = ("sqlite", "postgresql", "mysql", "mssql")  # what MLflow's SQL store accepts
_ANY_ADDRESS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class LocalServer:
    """The local tracking server of a data directory, as it is now.

    Attributes:
        running: it runs and answers at ``uri``.
        uri: where clients reach it (None when it is not running).
        pid: its process (None when it is not running).
        backend: the backend store URI, password masked (the running server's, else the configured one).
        artifact_root: where it keeps artifacts (the running server's, else the configured one).
        log: its log file.
        started: this call started it.
        note: something the user should know (the port it moved to, what holds the configured port).
    """

    running: bool
    uri: str | None
    pid: int | None
    backend: str
    artifact_root: str
    log: Path
    started: bool = False
    note: str | None = None


def tracking_uri(settings: Settings, start: bool = True) -> str:
    """The tracking URI to use: the configured one, or the local server's (started if needed).

    Raises:
        ShopsightError: no local server runs and ``start`` is false, or it cannot be started.
    """
    if settings.mlflow.tracking_uri:
        return settings.mlflow.tracking_uri
    server = local_server(settings)
    if server.running:
        return str(server.uri)
    if not start:
        raise ShopsightError("the local MLflow server is not running (`shopsight mlflow up` starts it)")
    return str(up(settings).uri)


def local_server(settings: Settings) -> LocalServer:
    """Whether this data directory's server runs, and where; starts nothing."""
    folder = _folder(settings)
    log = folder / "server.log"
    record = _read_record(folder)
    if record is not None and _is_ours(record, folder):
        if healthy(record["uri"]):
            return LocalServer(
                True, record["uri"], record["pid"], record["backend"], record["artifact_root"], log
            )
        return LocalServer(
            False, None, record["pid"], record["backend"], record["artifact_root"], log,
            note=f"its process {record['pid']} runs but does not answer at {record['uri']}; see {log}",
        )  # fmt: skip
    note = None
    host, port = settings.mlflow.host, settings.mlflow.port
    if not _port_free(host, port):
        note = f"port {port} is in use by another process (not this data directory's MLflow server)"
    return LocalServer(
        False, None, None, mask(backend_store_uri(settings)), artifact_root(settings), log, note=note
    )


def up(settings: Settings) -> LocalServer:
    """This data directory's server: the running one, else a new one started in the background.

    Raises:
        ShopsightError: ``mlflow.tracking_uri`` names a shared server; the running server has another
            backend or artifact root than configured; the backend cannot be reached; the port on a
            non-loopback host is taken; or the server does not come up.
    """
    if settings.mlflow.tracking_uri:
        raise ShopsightError(
            f"this profile uses the MLflow server at {settings.mlflow.tracking_uri} (mlflow.tracking_uri), "
            "run by its deployment: there is nothing to start here (`--set mlflow.tracking_uri=` starts a "
            "local one)"
        )
    server = local_server(settings)
    if server.running:
        wanted = (mask(backend_store_uri(settings)), artifact_root(settings))
        if (server.backend, server.artifact_root) != wanted:
            raise ShopsightError(
                f"the MLflow server of {Path(settings.data_dir).absolute()} already runs at {server.uri} "
                f"with backend {server.backend} and artifacts in {server.artifact_root}; stop it first "
                f"(`shopsight mlflow down`) to start it with {wanted[0]} and {wanted[1]}"
            )
        return server
    if server.pid is not None:  # ours, but hung: starting another would fight over the folder
        raise ShopsightError(f"the MLflow server {server.note}; `shopsight mlflow down` stops it")
    return _start(settings)


def _start(settings: Settings) -> LocalServer:
    folder = _folder(settings)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "server.log"
    backend = backend_store_uri(settings)
    check_backend(backend)
    artifacts = artifact_root(settings)
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    host, port, note = settings.mlflow.host, settings.mlflow.port, None
    if not _port_free(host, port):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ShopsightError(
                f"port {port} on {host} is in use by another process: choose another port "
                "(--set mlflow.port=N) or stop what holds it"
            )
        port, note = _free_port(host), f"port {port} is in use by another process: started on a free port"
    uri = f"http://{_client_host(host)}:{port}"
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend}  # the password stays out of `ps`
    env.pop("MLFLOW_DEFAULT_ARTIFACT_ROOT", None)  # artifacts go through the server (--serve-artifacts)
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the server process
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--serve-artifacts", "--artifacts-destination", artifacts,
         "--host", host, "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder, env=env,
    )  # fmt: skip
    log.close()
    deadline = time.time() + _START_TIMEOUT_S
    while time.time() < deadline:
        if process.poll() is not None:
            raise ShopsightError(
                f"the MLflow server exited at start{_log_reason(log_path, backend)}; see {log_path}"
            )
        if healthy(uri) and process.poll() is None:
            record = {
                "uri": uri,
                "pid": process.pid,
                "create_time": _create_time(process.pid),
                "host": host,
                "port": port,
                "backend": mask(backend),
                "artifact_root": artifacts,
            }
            partial = folder / "server.json.partial"
            partial.write_text(json.dumps(record) + "\n")
            partial.replace(folder / "server.json")
            _started_here.append(settings)
            return LocalServer(True, uri, process.pid, mask(backend), artifacts, log_path, True, note)
        time.sleep(0.5)
    _kill_group(process.pid)
    raise ShopsightError(f"the MLflow server did not answer within {_START_TIMEOUT_S} s; see {log_path}")


def stop_servers_started_here(grace_s: float = 15.0) -> int:
    """Stop the local servers this process started; for a command that failed, so that it leaves no
    long-lived server behind (a command that succeeds leaves it up for the next one), or was stopped by
    Ctrl-C (a shorter ``grace_s``). Returns how many."""
    stopped = sum(stop_local_server(settings, grace_s) for settings in _started_here)
    _started_here.clear()
    return stopped


def stop_local_server(settings: Settings, grace_s: float = 15.0) -> bool:
    """Stop this data directory's server, killed if it has not exited ``grace_s`` after SIGTERM (its SQL
    backend commits or rolls back whole transactions either way); returns whether one was stopped (never
    another process)."""
    folder = _folder(settings)
    record = _read_record(folder)
    if record is None:
        return False
    ours = _is_ours(record, folder)
    (folder / "server.json").unlink(missing_ok=True)
    if not ours:  # a stale record: its process is gone, or the pid now belongs to something else
        return False
    _kill_group(record["pid"], grace_s)
    return True


def backend_store_uri(settings: Settings) -> str:
    """The server's backend store: ``mlflow.backend_store_uri``, else SQLite under the data directory."""
    return settings.mlflow.backend_store_uri or f"sqlite:///{_folder(settings) / 'mlflow.db'}"


def artifact_root(settings: Settings) -> str:
    """Where the server keeps artifacts: ``mlflow.artifact_root`` (a local path made absolute, or a URI
    such as ``s3://bucket/prefix``), else ``<data_dir>/mlflow/artifacts``."""
    root = settings.mlflow.artifact_root
    if not root:
        return str(_folder(settings) / "artifacts")
    return root if "://" in root else str(Path(root).expanduser().absolute())


def mask(uri: str) -> str:
    """The URI with its password, if any, replaced by ``***``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", uri)
    return url.render_as_string(hide_password=True) if url.password else uri


def check_backend(uri: str) -> None:
    """Connect to the backend store once, so that a bad URI or an unreachable database fails here with one
    line naming it (password masked), not in the server's log.

    Raises:
        ShopsightError: not a SQL database URL MLflow supports, its driver is missing, or no connection.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    shown = mask(uri)
    example = "sqlite:////path/mlflow.db or postgresql+psycopg://USER@HOST:5432/mlflow"
    try:
        url = make_url(uri)
    except (ArgumentError, ValueError):
        raise ShopsightError(
            f"the MLflow backend store {shown!r} is not a database URL ({example})"
        ) from None
    if url.get_backend_name() not in _SQL_BACKENDS:
        raise ShopsightError(
            f"the MLflow backend store {shown} is not a SQL database MLflow supports "
            f"({', '.join(_SQL_BACKENDS)}), e.g. {example}"
        )
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ShopsightError(f"the MLflow backend store {shown} names no database file ({example})")
        if not Path(url.database).parent.is_dir():
            raise ShopsightError(
                f"the MLflow backend store {shown}: folder {Path(url.database).parent} does not exist"
            )
    connect_args = {"connect_timeout": 5} if url.get_backend_name() in ("postgresql", "mysql") else {}
    try:
        engine = create_engine(url, connect_args=connect_args, poolclass=NullPool)
    except (NoSuchModuleError, ImportError) as exc:
        raise ShopsightError(
            f"cannot use the MLflow backend store {shown}: its database driver is missing ({exc}); with "
            "psycopg 3 write postgresql+psycopg://"
        ) from None
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if url.password:
            reason = reason.replace(url.password, "***")
        raise ShopsightError(f"cannot connect to the MLflow backend store {shown}: {reason}") from None
    finally:
        engine.dispose()


def _folder(settings: Settings) -> Path:
    return Path(settings.data_dir).absolute() / "mlflow"


def _read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / "server.json").read_text())
    except (OSError, ValueError):
        return None
    needed = ("uri", "pid", "backend", "artifact_root")
    if not isinstance(record, dict) or any(key not in record for key in needed):
        return None  # written by an older version: treated as stale
    return record


def _is_ours(record: dict, folder: Path) -> bool:
    """The recorded process still runs (not a recycled pid), is an MLflow server, and works in ``folder``."""
    import psutil

    try:
        process = psutil.Process(int(record["pid"]))
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if record.get("create_time") is not None and abs(process.create_time() - record["create_time"]) > 1:
            return False
        command, cwd = process.cmdline(), process.cwd()
    except (psutil.Error, KeyError, TypeError, ValueError, OSError):
        return False
    return "mlflow" in command and "server" in command and Path(cwd) == folder.resolve()


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _kill_group(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group (the server and its workers), wait ``grace_s``, then insist."""
    import signal

    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap it when this process started it
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _log_reason(log_path: Path, backend: str) -> str:
    """``": <the log's last error line>"``, password masked, or nothing."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return ""
    errors = [line.strip() for line in lines if re.search(r"error|exception", line, re.IGNORECASE)]
    if not errors:
        return ""
    line = errors[-1][:300]
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        password = make_url(backend).password
        if password:
            line = line.replace(password, "***")
    return f": {line}"


def _client_host(host: str) -> str:
    if host in _ANY_ADDRESS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def healthy(uri: str) -> bool:
    """Whether an MLflow server answers at ``uri`` (any server: this says nothing of whose it is)."""
    import requests

    try:
        return requests.get(f"{uri}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError:
            return False
        return True


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host or "0.0.0.0", 0))
        return s.getsockname()[1]
