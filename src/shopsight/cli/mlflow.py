"""`shopsight mlflow`: start, inspect and stop this data directory's MLflow tracking server.

The server has a SQL backend (``mlflow.backend_store_uri``: SQLite under the data directory by default, or
PostgreSQL) and serves its artifact root (``mlflow.artifact_root``) to clients; it keeps running after
``up`` returns, and every command of this data directory uses it (see
:mod:`shopsight.platform.mlflow_server`). With ``mlflow.tracking_uri`` set (the ``cluster`` profile) the
profile's shared server is used instead, and ``status`` reports whether it answers.

With ``mlflow.auth`` the server runs MLflow's basic-auth app and ``user add`` / ``user grant`` manage its
users, as its admin (``mlflow.admin_username``, password from ``MLFLOW_AUTH_ADMIN_PASSWORD`` or
``mlflow.admin_password_file``). A user's password comes from standard input or a named environment
variable, never from the command line, which ``ps`` shows.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Literal

import typer

from shopsight.cli._context import state
from shopsight.cli._output import OutputOption, emit
from shopsight.platform import (
    ShopsightError,
    Stopwatch,
    console,
    err_console,
    print_summary,
    spinner,
    summary_table,
)

app = typer.Typer(
    help="Start, inspect and stop this data directory's MLflow tracking server (SQL backend, artifacts).",
    no_args_is_help=True,
)
user_app = typer.Typer(
    help="MLflow users and their permissions on registered models and experiments (with mlflow.auth).",
    no_args_is_help=True,
)
app.add_typer(user_app, name="user")


def _rows(server, settings) -> dict[str, object]:
    rows: dict[str, object] = {"tracking URI": server.uri, "backend store": server.backend}
    rows["artifact root"] = server.artifact_root
    rows["authentication"] = (
        f"MLflow basic-auth (admin user {settings.mlflow.admin_username})" if server.auth else "none"
    )
    rows["pid"] = server.pid
    rows["log"] = server.log
    return rows


@app.command("up")
def up_command(ctx: typer.Context) -> None:
    """Start the tracking server (or find it running) and print its URI, backend and artifact root.

    Settings: mlflow.backend_store_uri (default SQLite under data_dir; e.g.
    postgresql+psycopg://mlflow@HOST:5432/mlflow, password from PGPASSWORD), mlflow.artifact_root,
    mlflow.host (127.0.0.1), mlflow.port (5000; a port another process holds is replaced by a free one),
    mlflow.auth (MLflow's basic-auth app; the first start creates the admin from MLFLOW_AUTH_ADMIN_PASSWORD
    or mlflow.admin_password_file).
    """
    from shopsight.platform.mlflow_server import up

    settings = state(ctx).settings
    watch = Stopwatch()
    with spinner("starting the MLflow tracking server"):
        server = up(settings)
    if server.note:
        err_console.print(f"[yellow]note:[/yellow] {server.note}", soft_wrap=True)
    title = "MLflow server started" if server.started else "MLflow server already running"
    rows = _rows(server, settings)
    if server.started:
        rows["took"] = f"{watch.seconds:.1f} s"
    print_summary(title, rows)
    console.print(f"Use it from Python with mlflow.set_tracking_uri({server.uri!r}); stop it with "
                  "`shopsight mlflow down`.")  # fmt: skip


@app.command("status")
def status_command(ctx: typer.Context, output: OutputOption = "table") -> None:
    """Whether the tracking server runs, and where (URI, backend, artifact root, pid, log). Exit status 1
    when it does not run (or, shared, does not answer).

    With -o json or yaml: shared (the profile's server, mlflow.tracking_uri, or this data directory's),
    running (for a shared server: whether it answers), tracking_uri, backend_store, artifact_root, auth,
    pid, log, note, user and user_is_admin (with mlflow.auth, on a shared server); null where unknown.
    """
    from shopsight.platform.mlflow_server import healthy, local_server

    settings = state(ctx).settings
    data: dict = {
        "shared": bool(settings.mlflow.tracking_uri),
        "running": False,
        "tracking_uri": None,
        "backend_store": None,
        "artifact_root": None,
        "auth": settings.mlflow.auth,
        "pid": None,
        "log": None,
        "note": None,
        "user": None,
        "user_is_admin": None,
    }
    if settings.mlflow.tracking_uri:
        uri = settings.mlflow.tracking_uri
        answers = healthy(uri)
        data.update(running=answers, tracking_uri=uri)
        user = None
        if answers and settings.mlflow.auth:
            from shopsight.platform.mlflow_server import authenticated_user

            user = authenticated_user(settings)
            data.update(user=user.name, user_is_admin=user.is_admin)

        def shared() -> list[str]:
            shown = [
                f"MLflow server: the profile's shared server {uri} (mlflow.tracking_uri) "
                f"{'answers' if answers else 'does not answer'}; it is run by its deployment, not by this "
                "command."
            ]
            if user is not None:
                shown.append(f"Logged in as MLflow user {user.name}{' (admin)' if user.is_admin else ''}.")
            return shown

        emit(output, data, shared)
        if not answers:
            raise typer.Exit(1)
        return
    server = local_server(settings)
    data.update(
        running=server.running,
        tracking_uri=server.uri,
        backend_store=server.backend,
        artifact_root=server.artifact_root,
        auth=server.auth,
        pid=server.pid,
        log=server.log,
        note=server.note or None,
    )
    if server.running:
        emit(output, data, lambda: summary_table("MLflow server running", _rows(server, settings)))
        return
    emit(
        output,
        data,
        lambda: f"MLflow server: not running for {settings.data_dir.absolute()} (`shopsight mlflow up`).",
    )
    if server.note:
        err_console.print(f"[yellow]note:[/yellow] {server.note}", soft_wrap=True)
    raise typer.Exit(1)  # a script's "down", as `cluster status` says it


@app.command("down")
def down_command(ctx: typer.Context) -> None:
    """Stop the tracking server this data directory started (its data stays)."""
    from shopsight.platform.mlflow_server import local_server, stop_local_server

    settings = state(ctx).settings
    if settings.mlflow.tracking_uri:
        raise ShopsightError(
            f"this profile uses the MLflow server at {settings.mlflow.tracking_uri} (mlflow.tracking_uri), "
            "run by its deployment: `shopsight mlflow down` stops only a local one"
        )
    server = local_server(settings)
    if stop_local_server(settings):
        console.print(f"Stopped the MLflow server{' at ' + server.uri if server.uri else ''} "
                      f"(pid {server.pid}); its data stays in {server.backend}.")  # fmt: skip
    else:
        console.print(f"No MLflow server of {settings.data_dir.absolute()} was running.")


_PERMISSION = Annotated[
    Literal["READ", "EDIT", "MANAGE"],
    typer.Option(
        "--permission",
        help="READ (see), EDIT (register versions, move aliases: promote and roll back) or MANAGE (EDIT, "
        "delete, grant to others).",
        case_sensitive=False,
    ),
]
_MODELS = Annotated[
    list[str] | None,
    typer.Option("--model", help="A registered model to grant it on (repeatable; '*': all of them)."),
]
_EXPERIMENTS = Annotated[
    list[str] | None,
    typer.Option("--experiment", help="An experiment to grant it on, by name (repeatable; '*': all)."),
]


def _grant(settings, name: str, permission: str, models, experiments) -> list[str]:
    from shopsight.platform.mlflow_server import grant

    if not models and not experiments:  # no scope named: every model and experiment
        models, experiments = ["*"], ["*"]
    return grant(settings, name, permission.upper(), models or [], experiments or [])


def _read_password(password_env: str | None) -> str:
    """The new user's password: from the variable ``password_env``, else typed twice at a terminal, else
    the first line of standard input (``printf %s "$PW" | shopsight mlflow user add ...``)."""
    if password_env:
        password = os.environ.get(password_env, "")
        if not password:
            raise ShopsightError(f"--password-env {password_env}: that environment variable is not set")
        return password
    if sys.stdin.isatty():
        return typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ShopsightError("no password on standard input (or give --password-env NAME)")
    return password


@user_app.command("add")
def user_add_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The new MLflow user's name.")],
    permission: _PERMISSION = "READ",
    model: _MODELS = None,
    experiment: _EXPERIMENTS = None,
    password_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding the password (else: standard input)."),
    ] = None,
) -> None:
    """Create an MLflow user and grant it a permission (default: on every model and experiment).

    A promoter needs EDIT on the models it promotes; a trainer EDIT on its models and experiments; serving
    READ. The password (12 or more characters) comes from standard input or --password-env, never from
    the command line. Runs as the admin: MLFLOW_AUTH_ADMIN_PASSWORD or mlflow.admin_password_file.
    """
    from shopsight.platform.mlflow_server import add_user

    settings = state(ctx).settings
    add_user(settings, name, _read_password(password_env))
    granted = _grant(settings, name, permission, model, experiment)
    console.print(f"Created MLflow user {name} with {permission.upper()} on {', '.join(granted)}.")


@user_app.command("grant")
def user_grant_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="An existing MLflow user.")],
    permission: _PERMISSION,
    model: _MODELS = None,
    experiment: _EXPERIMENTS = None,
) -> None:
    """Give a user a permission on models or experiments (default: all), replacing the one it had there."""
    settings = state(ctx).settings
    granted = _grant(settings, name, permission, model, experiment)
    console.print(f"MLflow user {name} now has {permission.upper()} on {', '.join(granted)}.")
