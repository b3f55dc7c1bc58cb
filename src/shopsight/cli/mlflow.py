"""`shopsight mlflow`: start, inspect and stop this data directory's MLflow tracking server.

The server has a SQL backend (``mlflow.backend_store_uri``: SQLite under the data directory by default, or
PostgreSQL) and serves its artifact root (``mlflow.artifact_root``) to clients; it keeps running after
``up`` returns, and every command of this data directory uses it (see
:mod:`shopsight.platform.mlflow_server`). With ``mlflow.tracking_uri`` set (the ``cluster`` profile) the
profile's shared server is used instead, and ``status`` reports whether it answers.
"""

from __future__ import annotations

import typer

from shopsight.cli._context import state
from shopsight.platform import ShopsightError, Stopwatch, console, print_summary

app = typer.Typer(
    help="Start, inspect and stop this data directory's MLflow tracking server (SQL backend, artifacts).",
    no_args_is_help=True,
)


def _rows(server) -> dict[str, object]:
    rows: dict[str, object] = {"tracking URI": server.uri, "backend store": server.backend}
    rows["artifact root"] = server.artifact_root
    rows["pid"] = server.pid
    rows["log"] = server.log
    return rows


@app.command("up")
def up_command(ctx: typer.Context) -> None:
    """Start the tracking server (or find it running) and print its URI, backend and artifact root.

    Settings: mlflow.backend_store_uri (default SQLite under data_dir; e.g.
    postgresql+psycopg://mlflow@HOST:5432/mlflow, password from PGPASSWORD), mlflow.artifact_root,
    mlflow.host (127.0.0.1), mlflow.port (5000; a port another process holds is replaced by a free one).
    """
    from shopsight.platform.mlflow_server import up

    settings = state(ctx).settings
    watch = Stopwatch()
    with console.status("starting the MLflow tracking server"):
        server = up(settings)
    if server.note:
        console.print(f"[yellow]note:[/yellow] {server.note}", soft_wrap=True)
    title = "MLflow server started" if server.started else "MLflow server already running"
    rows = _rows(server)
    if server.started:
        rows["took"] = f"{watch.seconds:.1f} s"
    print_summary(title, rows)
    console.print(f"Use it from Python with mlflow.set_tracking_uri({server.uri!r}); stop it with "
                  "`shopsight mlflow down`.")  # fmt: skip


@app.command("status")
def status_command(ctx: typer.Context) -> None:
    """Whether the tracking server runs, and where (URI, backend, artifact root, pid, log)."""
    from shopsight.platform.mlflow_server import healthy, local_server

    settings = state(ctx).settings
    if settings.mlflow.tracking_uri:
        uri = settings.mlflow.tracking_uri
        answers = healthy(uri)
        console.print(
            f"MLflow server: the profile's shared server {uri} (mlflow.tracking_uri) "
            f"{'answers' if answers else 'does not answer'}; it is run by its deployment, not by this "
            "command."
        )
        return
    server = local_server(settings)
    if server.running:
        print_summary("MLflow server running", _rows(server))
        return
    console.print(f"MLflow server: not running for {settings.data_dir.absolute()} (`shopsight mlflow up`).")
    if server.note:
        console.print(f"[yellow]note:[/yellow] {server.note}", soft_wrap=True)


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
