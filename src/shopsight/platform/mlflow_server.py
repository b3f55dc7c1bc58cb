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

Authentication (``mlflow.auth``; on in the ``cluster`` profile) is MLflow's own basic-auth app: users and
their permissions live in its user store, every request carries a login, and moving a registered model's
aliases needs EDIT or MANAGE on that model (MLflow's ``SetRegisteredModelAlias`` check), so an
unauthenticated POST can no longer set ``champion``. The local server runs ``mlflow server --app-name
basic-auth`` with a config file under ``<data_dir>/mlflow`` (users in SQLite beside it); its admin
(``mlflow.admin_username``) is created on the first start from ``MLFLOW_AUTH_ADMIN_PASSWORD`` or
``mlflow.admin_password_file``. Clients log in with MLflow's own ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` (or ``mlflow.credentials_file``); :func:`tracking_uri` checks the login once,
so a wrong password is one clear line, and :func:`login` says which MLflow user the audit trail names.
Passwords travel by environment or file only: never on a command line (``ps`` shows those), never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shopsight.platform._errors import ShopsightError
from shopsight.platform._settings import Settings

_START_TIMEOUT_S = 90
_started_here: list[Settings] = []  # the servers this process started (stopped if its command fails)
_SQL_BACKENDS = ("sqlite", "postgresql", "mysql", "mssql")  # what MLflow's SQL store accepts
_ANY_ADDRESS = ("0.0.0.0", "::", "")
# MLflow's basic-auth routes (mlflow.server.auth.routes), called with plain requests: checking a login
# then needs no import of MLflow's server
_CURRENT_USER = "/api/2.0/mlflow/users/current"
_CREATE_USER = "/api/2.0/mlflow/users/create"
_GET_USER = "/api/2.0/mlflow/users/get"
_GET_PERMISSION = "/api/3.0/mlflow/users/permissions/get"
_GRANT = "/api/3.0/mlflow/users/permissions/grant"
_REVOKE = "/api/3.0/mlflow/users/permissions/revoke"
_EXPERIMENT_BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"
_LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # what MLflow's client reads
_ADMIN_PASSWORD_VARIABLE = "MLFLOW_AUTH_ADMIN_PASSWORD"  # what MLflow's server reads
PERMISSIONS = ("READ", "EDIT", "MANAGE")  # what `shopsight mlflow user` grants
MOVES_ALIASES = ("EDIT", "MANAGE")  # the permissions on a registered model that let a user set its aliases


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
        auth: it runs MLflow's basic-auth app (the running server's, else ``mlflow.auth``).
    """

    running: bool
    uri: str | None
    pid: int | None
    backend: str
    artifact_root: str
    log: Path
    started: bool = False
    note: str | None = None
    auth: bool = False


@dataclass(frozen=True)
class MlflowUser:
    """A user as the MLflow server authenticated it: whom its permission checks were made for."""

    name: str
    is_admin: bool


@dataclass(frozen=True)
class _Credentials:
    username: str
    password: str = field(repr=False)
    source: str  # where they came from, for messages


class MlflowAuthApiError(ShopsightError):
    """A call of MLflow's user API that the server refused (HTTP status and MLflow's error code)."""

    def __init__(self, message: str, status: int, error_code: str = "") -> None:
        super().__init__(message)
        self.status, self.error_code = status, error_code


_logins: dict[tuple[str, str, str], MlflowUser] = {}  # logins checked by this process


def tracking_uri(settings: Settings, start: bool = True) -> str:
    """The tracking URI to use: the configured one, or the local server's (started if needed). With
    ``mlflow.auth`` this client's login is checked first (:func:`login`).

    Raises:
        ShopsightError: no local server runs and ``start`` is false, or it cannot be started; the login
            is missing or refused.
    """
    uri = _server_uri(settings, start)
    if settings.mlflow.auth:
        login(settings, uri)
    return uri


def _server_uri(settings: Settings, start: bool = True) -> str:
    if settings.mlflow.tracking_uri:
        return settings.mlflow.tracking_uri
    server = local_server(settings)
    if server.running:
        if server.auth and not settings.mlflow.auth:  # every request would be refused (HTTP 401)
            raise ShopsightError(
                f"the MLflow server at {server.uri} runs with authentication: set mlflow.auth=true and log "
                "in with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or mlflow.credentials_file)"
            )
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
        auth = bool(record.get("auth", False))  # a record written before mlflow.auth: a server without
        if healthy(record["uri"]):
            return LocalServer(
                True, record["uri"], record["pid"], record["backend"], record["artifact_root"], log,
                auth=auth,
            )  # fmt: skip
        return LocalServer(
            False, None, record["pid"], record["backend"], record["artifact_root"], log,
            note=f"its process {record['pid']} runs but does not answer at {record['uri']}; see {log}",
            auth=auth,
        )  # fmt: skip
    note = None
    host, port = settings.mlflow.host, settings.mlflow.port
    if not _port_free(host, port):
        note = f"port {port} is in use by another process (not this data directory's MLflow server)"
    return LocalServer(
        False, None, None, mask(backend_store_uri(settings)), artifact_root(settings), log, note=note,
        auth=settings.mlflow.auth,
    )  # fmt: skip


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
        if server.auth != settings.mlflow.auth:
            raise ShopsightError(
                f"the MLflow server of {Path(settings.data_dir).absolute()} already runs at {server.uri} "
                f"{'with' if server.auth else 'without'} authentication; stop it first (`shopsight mlflow "
                f"down`) to start it {'with' if settings.mlflow.auth else 'without'} (mlflow.auth)"
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
    for name in _LOGIN_VARIABLES:  # a client's login is no business of the server's
        env.pop(name, None)
    command = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts", "--artifacts-destination",
               artifacts, "--host", host, "--port", str(port), "--workers", "1"]  # fmt: skip
    if settings.mlflow.auth:
        env.update(_auth_environment(settings, folder))
        command += ["--app-name", "basic-auth"]
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the server process
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder, env=env
    )
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
                "auth": settings.mlflow.auth,
            }
            partial = folder / "server.json.partial"
            partial.write_text(json.dumps(record) + "\n")
            partial.replace(folder / "server.json")
            _started_here.append(settings)
            return LocalServer(
                True, uri, process.pid, mask(backend), artifacts, log_path, True, note, settings.mlflow.auth
            )
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


# ------------------------------------------------------------------------------------- authentication


def login(settings: Settings, uri: str) -> MlflowUser:
    """Log in to the server at ``uri`` as this client's MLflow user and return who the server says it is
    (checked once per process and login, so that a missing or wrong login fails here, in one line, and
    not as an HTTP 401 in the middle of a command).

    With ``mlflow.credentials_file`` its login is also exported as MLflow's ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD``: MLflow's client reads them at each request, in this process and in those
    it starts (the gate's evaluation, local Ray workers), so that is how the file's login reaches them all.

    Raises:
        ShopsightError: no login, a refused one, or a server without authentication.
    """
    import requests

    found = client_credentials(settings)
    if found is None:
        raise ShopsightError(
            f"the MLflow server at {uri} needs a login (mlflow.auth is on): set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or mlflow.credentials_file"
        )
    if settings.mlflow.credentials_file:
        os.environ.update(zip(_LOGIN_VARIABLES, (found.username, found.password), strict=True))
    key = (uri, found.username, hashlib.sha256(found.password.encode()).hexdigest())
    if key in _logins:
        return _logins[key]
    try:
        answer = requests.get(uri + _CURRENT_USER, auth=(found.username, found.password), timeout=10)
    except requests.RequestException as exc:
        raise ShopsightError(f"cannot reach the MLflow server at {uri}: {type(exc).__name__}") from None
    if answer.status_code == 401:
        raise ShopsightError(
            f"the MLflow server at {uri} refused the login of user {found.username!r} (from {found.source}): "
            "wrong password or no such user"
        )
    if answer.status_code == 404:  # no such route: the server runs without the basic-auth app
        how = (
            "deploy it with --app-name basic-auth (infra/k8s/base/mlflow.yaml)"
            if settings.mlflow.tracking_uri
            else "`shopsight mlflow down`, then `shopsight mlflow up` starts it with authentication"
        )
        raise ShopsightError(
            f"mlflow.auth is on, but the MLflow server at {uri} runs without authentication: {how}"
        )
    if answer.status_code != 200:
        raise ShopsightError(
            f"the MLflow server at {uri} answered HTTP {answer.status_code} to the login of user "
            f"{found.username!r}"
        )
    user = answer.json()["user"]
    _logins[key] = MlflowUser(user["username"], bool(user.get("is_admin")))
    return _logins[key]


def authenticated_user(settings: Settings) -> MlflowUser | None:
    """This client's MLflow user as the server authenticated it; None when ``mlflow.auth`` is off."""
    if not settings.mlflow.auth:
        return None
    return login(settings, _server_uri(settings))


def client_credentials(settings: Settings) -> _Credentials | None:
    """This client's MLflow login: ``mlflow.credentials_file``, else MLflow's own lookup (the
    ``MLFLOW_TRACKING_*`` variables, else ``~/.mlflow/credentials``); None when there is none.

    Raises:
        ShopsightError: the file cannot be read, or a user without a password (or the reverse).
    """
    path = settings.mlflow.credentials_file
    if path:
        username, password = _read_credentials_file(Path(path).expanduser())
        source = f"mlflow.credentials_file {path}"
    else:
        from mlflow.utils.credentials import read_mlflow_creds

        username, password = read_mlflow_creds()
        source = (
            "MLFLOW_TRACKING_USERNAME" if os.environ.get(_LOGIN_VARIABLES[0]) else "~/.mlflow/credentials"
        )
    if not username and not password:
        return None
    if not username or not password:
        missing = "user name" if not username else "password"
        raise ShopsightError(f"the MLflow login from {source} has no {missing}")
    return _Credentials(username, password, source)


def _read_credentials_file(path: Path) -> tuple[str | None, str | None]:
    import configparser

    parser = configparser.ConfigParser(interpolation=None)  # a password may hold a %
    try:
        with path.open() as f:
            parser.read_file(f)
    except OSError as exc:
        raise ShopsightError(f"cannot read mlflow.credentials_file {path}: {exc.strerror or exc}") from None
    except configparser.Error:
        parser = configparser.ConfigParser()  # not an INI file: reported below, without quoting it
    section = parser["mlflow"] if parser.has_section("mlflow") else {}
    username, password = (section.get(name.lower()) for name in _LOGIN_VARIABLES)
    if not username or not password:
        raise ShopsightError(
            f"mlflow.credentials_file {path} must hold an [mlflow] section with mlflow_tracking_username "
            "and mlflow_tracking_password (MLflow's credentials format)"
        )
    return username, password


def registered_model_permission(settings: Settings, name: str) -> tuple[MlflowUser, str]:
    """This client's MLflow user and its permission on registered model ``name`` (READ, EDIT, MANAGE,
    NO_PERMISSIONS, ...) as the server resolves it for its own checks (grants, else the default
    permission); ``ADMIN`` for an admin, whom MLflow never checks."""
    uri = _server_uri(settings)
    user = login(settings, uri)
    if user.is_admin:
        return user, "ADMIN"
    found = client_credentials(settings)
    assert found is not None  # login() needed it
    answer = _call(
        "GET", uri, _GET_PERMISSION, (found.username, found.password),
        params={"username": user.name, "resource_type": "registered_model", "resource_id": name},
    )  # fmt: skip
    return user, str(answer.get("permission", "NO_PERMISSIONS"))


def admin_password(settings: Settings) -> str | None:
    """The MLflow admin's password: ``mlflow.admin_password_file``, else ``MLFLOW_AUTH_ADMIN_PASSWORD``."""
    path = settings.mlflow.admin_password_file
    if not path:
        return os.environ.get(_ADMIN_PASSWORD_VARIABLE) or None
    try:
        password = Path(path).expanduser().read_text().strip("\r\n")
    except OSError as exc:
        raise ShopsightError(
            f"cannot read mlflow.admin_password_file {path}: {exc.strerror or exc}"
        ) from None
    if not password:
        raise ShopsightError(f"mlflow.admin_password_file {path} is empty")
    return password


def add_user(settings: Settings, username: str, password: str) -> None:
    """Create MLflow user ``username``, as the admin (it then has the default permission everywhere).

    Raises:
        ShopsightError: auth is off, the admin login fails, the user exists, or MLflow refuses the
            password (fewer than 12 characters).
    """
    uri, admin = _admin(settings)
    try:
        _call("POST", uri, _CREATE_USER, admin, json={"username": username, "password": password})
    except MlflowAuthApiError as exc:
        if exc.error_code == "RESOURCE_ALREADY_EXISTS":
            raise ShopsightError(
                f"MLflow user {username!r} already exists: `shopsight mlflow user grant` changes what it "
                "may do"
            ) from None
        raise ShopsightError(f"MLflow refused to create user {username!r}: {exc}") from None


def grant(
    settings: Settings,
    username: str,
    permission: str,
    models: list[str] | tuple[str, ...] = (),
    experiments: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """Give ``username`` ``permission`` on each registered model and experiment named (``*``: all of
    them), replacing what it had there; returns what was granted (``registered model NAME``, ...).

    A promoter needs EDIT or MANAGE on the model (moving an alias, writing its history); a trainer also
    EDIT on the task's experiment (logging runs). MLflow's grants are per model, not per alias: whoever
    may move ``challenger`` may also move ``champion``, so only the gate's users should hold EDIT.
    """
    if permission not in PERMISSIONS:
        raise ShopsightError(f"unknown permission {permission!r}: choose one of {', '.join(PERMISSIONS)}")
    uri, admin = _admin(settings)
    try:
        _call("GET", uri, _GET_USER, admin, params={"username": username})
    except MlflowAuthApiError as exc:
        if exc.status != 404:
            raise
        raise ShopsightError(
            f"no MLflow user {username!r} (`shopsight mlflow user add` creates it)"
        ) from None
    targets = [("registered_model", model, f"registered model {model}") for model in models]
    for experiment in experiments:
        targets.append(("experiment", _experiment_id(uri, admin, experiment), f"experiment {experiment}"))
    granted = []
    for resource_type, resource_id, shown in targets:
        where = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
        # a grant that exists is refused (RESOURCE_ALREADY_EXISTS): replace it
        with contextlib.suppress(MlflowAuthApiError):
            _call("POST", uri, _REVOKE, admin, json=where)
        _call("POST", uri, _GRANT, admin, json={**where, "permission": permission})
        granted.append(shown)
    return granted


def _experiment_id(uri: str, admin: tuple[str, str], name: str) -> str:
    if name == "*":
        return name
    try:
        answer = _call("GET", uri, _EXPERIMENT_BY_NAME, admin, params={"experiment_name": name})
    except MlflowAuthApiError as exc:
        if exc.status != 404:
            raise
        raise ShopsightError(f"no MLflow experiment named {name!r}") from None
    return str(answer["experiment"]["experiment_id"])


def _admin(settings: Settings) -> tuple[str, tuple[str, str]]:
    """The server's URI and the admin's login, checked."""
    if not settings.mlflow.auth:
        raise ShopsightError("mlflow.auth is off: the MLflow server has no users (--set mlflow.auth=true)")
    username, password = settings.mlflow.admin_username, admin_password(settings)
    if not password:
        raise ShopsightError(
            f"managing MLflow users needs the admin {username!r}'s password: set "
            f"{_ADMIN_PASSWORD_VARIABLE} or mlflow.admin_password_file"
        )
    uri = _server_uri(settings)
    try:
        me = _call("GET", uri, _CURRENT_USER, (username, password))["user"]
    except MlflowAuthApiError as exc:
        if exc.status == 401:
            raise ShopsightError(
                f"the MLflow server at {uri} refused the login of admin {username!r}: wrong password "
                f"({_ADMIN_PASSWORD_VARIABLE} or mlflow.admin_password_file) or no such user"
            ) from None
        raise
    if not me.get("is_admin"):
        raise ShopsightError(f"MLflow user {username!r} (mlflow.admin_username) is no admin")
    return uri, (username, password)


def _call(method: str, uri: str, path: str, auth: tuple[str, str], **kwargs) -> dict:
    """One request to MLflow's user API; its refusal as :class:`MlflowAuthApiError` with MLflow's message."""
    import requests

    try:
        answer = requests.request(method, uri + path, auth=auth, timeout=30, **kwargs)
    except requests.RequestException as exc:
        raise ShopsightError(f"cannot reach the MLflow server at {uri}: {type(exc).__name__}") from None
    if answer.ok:
        return answer.json() if answer.content else {}
    try:
        body = answer.json()
        code, message = str(body.get("error_code", "")), str(body.get("message", ""))
    except ValueError:  # 401 and 403 come as plain text
        code, message = "", answer.text.strip()
    message = message.splitlines()[0][:300] if message else f"HTTP {answer.status_code}"
    raise MlflowAuthApiError(message, answer.status_code, code)


def _auth_environment(settings: Settings, folder: Path) -> dict[str, str]:
    """What makes ``mlflow server --app-name basic-auth`` this data directory's: its config file (users in
    SQLite beside it), the static Flask key its CSRF protection needs, and the admin's name and, for the
    first start, password. Secrets go by environment and 0600 files, never on the command line.

    Raises:
        ShopsightError: the first start (no user store yet) without the admin's password.
    """
    users = folder / "basic_auth.db"
    password = admin_password(settings)
    if password is None and not users.exists():
        raise ShopsightError(
            f"the first start of the MLflow server with mlflow.auth creates its admin "
            f"{settings.mlflow.admin_username!r}: give its password (12 or more characters) as "
            f"{_ADMIN_PASSWORD_VARIABLE} or in mlflow.admin_password_file"
        )
    config = folder / "basic_auth.ini"
    _write_private(
        config,
        "[mlflow]\n"
        f"default_permission = {settings.mlflow.auth_default_permission}\n"
        f"database_uri = sqlite:///{users}\n"
        f"admin_username = {settings.mlflow.admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    key = folder / "flask_secret_key"
    if not key.exists():
        _write_private(key, secrets.token_hex(32))
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": settings.mlflow.admin_username,  # MLflow prefers it to the file's
        "MLFLOW_FLASK_SERVER_SECRET_KEY": key.read_text().strip(),
    }
    if password is not None:
        env[_ADMIN_PASSWORD_VARIABLE] = password
    return env


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT


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


@contextlib.contextmanager
def quick_requests(timeout_s: float = 5.0):
    """MLflow client calls inside make one try with a short timeout. MLflow retries a refused request 7 times
    with a growing backoff (minutes in all), which is right for a command but stalls training, or the report
    of a failure, on a server that is away. MLflow reads these variables per request, so they are set for
    the block only (process-wide: the block is meant for a worker's or an error path's few calls)."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def wait_for_server(settings: Settings, uri: str, log=print) -> str:
    """The tracking URI to go on with once the server at ``uri`` answers again.

    The local server of the data directory is started again at once (the runs are in its backend store, so
    a run goes on where it was); a configured server (``mlflow.tracking_uri``) is waited for, up to
    ``mlflow.outage_wait_s``, as its deployment restarts it.

    Raises:
        ShopsightError: the local server cannot be started, or the configured one did not answer in time.
    """
    if healthy(uri):
        return uri
    if not settings.mlflow.tracking_uri:
        log(f"the local MLflow server at {uri} stopped answering: starting it again")
        restarted = tracking_uri(settings)
        if restarted != uri:
            log(f"the local MLflow server is back at {restarted}")
        return restarted
    wait_s = settings.mlflow.outage_wait_s
    log(
        f"MLflow at {uri} does not answer: waiting up to {wait_s:g} s (mlflow.outage_wait_s) for it to return"
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if healthy(uri):
            log(f"MLflow at {uri} answers again")
            return uri
    raise ShopsightError(f"MLflow at {uri} did not answer for {wait_s:g} s (mlflow.outage_wait_s)")


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        # as the server binds (uvicorn sets SO_REUSEADDR): a server just killed leaves its connections in
        # TIME_WAIT, which fail a plain bind though a restart on the same port works
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
