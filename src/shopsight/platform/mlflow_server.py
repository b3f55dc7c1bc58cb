"""The MLflow tracking server of a profile.

``local``: a server on 127.0.0.1 backed by SQLite, with its artifacts under ``<data_dir>/mlflow``, started
on first use and reused by later commands (its address is kept in ``<data_dir>/mlflow/server.json``).
``cluster``: the shared server at ``mlflow.tracking_uri``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from shopsight.platform._errors import ShopsightError
from shopsight.platform._settings import Settings

_START_TIMEOUT_S = 90


def tracking_uri(settings: Settings, start: bool = True) -> str:
    """The tracking URI to use: the configured one, or the local server (started if needed)."""
    if settings.mlflow.tracking_uri:
        return settings.mlflow.tracking_uri
    folder = Path(settings.data_dir).absolute() / "mlflow"
    state = folder / "server.json"
    if state.exists():
        info = json.loads(state.read_text())
        if _healthy(info["uri"]):
            return info["uri"]
    if not start:
        raise ShopsightError("the local MLflow server is not running")
    return start_local_server(settings)


def start_local_server(settings: Settings) -> str:
    """Start the local MLflow server in the background (it outlives this command); returns its URI."""
    folder = Path(settings.data_dir).absolute() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    backend = settings.mlflow.backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}"
    artifacts = settings.mlflow.artifact_root or str(folder / "artifacts")
    port = settings.mlflow.port if _port_free(settings.mlflow.port) else _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(folder / "server.log", "ab")  # noqa: SIM115 - handed to the server process
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--default-artifact-root", artifacts, "--serve-artifacts", "--artifacts-destination", artifacts,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
    )  # fmt: skip
    deadline = time.time() + _START_TIMEOUT_S
    while time.time() < deadline:
        if process.poll() is not None:
            raise ShopsightError(f"the MLflow server exited at start; see {folder / 'server.log'}")
        if _healthy(uri):
            (folder / "server.json").write_text(json.dumps({"uri": uri, "pid": process.pid}) + "\n")
            return uri
        time.sleep(0.5)
    process.kill()
    raise ShopsightError(
        f"the MLflow server did not answer within {_START_TIMEOUT_S} s; see {folder / 'server.log'}"
    )


def stop_local_server(settings: Settings) -> bool:
    """Stop the local server if this data directory started one; returns whether one was stopped."""
    import signal

    state = Path(settings.data_dir).absolute() / "mlflow" / "server.json"
    if not state.exists():
        return False
    info = json.loads(state.read_text())
    state.unlink()
    try:
        os.killpg(info["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return False
    # the server and its job consumers share the process group: wait for all of them, then insist
    deadline = time.time() + 15
    while time.time() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap it when this process started it
            os.waitpid(info["pid"], os.WNOHANG)
        try:
            os.killpg(info["pid"], 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(info["pid"], signal.SIGKILL)
    return True


def _healthy(uri: str) -> bool:
    import requests

    try:
        return requests.get(f"{uri}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
