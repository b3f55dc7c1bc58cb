"""`shopsight serve`: deploy, inspect and shut down the Ray Serve application of the champion models.

``deploy`` needs a Ray cluster that outlives the command: with ``ray.address`` unset (the local profile)
it joins this data directory's local Ray head (the one `shopsight cluster up` starts, token auth
included), or starts it (recorded as started by ``serve deploy``) so that it keeps serving after the
command returns; ``shutdown --stop-ray`` stops a head that ``deploy`` started, and only that one. With
``ray.address`` set to a ``ray://`` client address it deploys to that cluster.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.table import Table

from shopsight.cli._context import state
from shopsight.cli._output import OutputOption, emit
from shopsight.platform import (
    PromotionRefused,
    Settings,
    ShopsightError,
    console,
    err_console,
    note,
    print_summary,
    spinner,
    summary_table,
)

app = typer.Typer(
    help="Deploy, inspect and shut down the Ray Serve application of the champion models.",
    no_args_is_help=True,
)


SERVE_STARTED = "shopsight serve deploy"


def connect(settings: Settings, start: bool) -> str | None:
    """Connect this process to the Ray cluster that serves; returns the Ray dashboard URL (if any).

    Raises:
        ShopsightError: no cluster runs (and ``start`` is false), or ``ray.address`` is a jobs URL.
    """
    import ray

    from shopsight.platform.ray_cluster import join_head, local_head, start_local_head

    if ray.is_initialized():
        return _ray_dashboard()
    address = settings.ray.address
    if address:
        if address.startswith(("http://", "https://")):
            raise ShopsightError(
                f"ray.address {address} is the jobs API: deploy from inside the cluster (as a Ray job) or "
                "set ray.address to the head's client address, ray://HEAD:10001"
            )
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except ConnectionError:
            raise ShopsightError(f"no Ray cluster is running at {address}: nothing is served") from None
        return _ray_dashboard()
    head = local_head(settings)
    if head is None:
        if not start:
            raise ShopsightError(
                "no Ray head of this data directory is running: nothing is served "
                "(`shopsight serve deploy` or `shopsight cluster up` starts one)"
            )
        with spinner("starting a local Ray head (it keeps serving after this command)"):
            head, _ = start_local_head(settings, started_by=SERVE_STARTED)
    join_head(head, log_to_driver=False, logging_level="ERROR")
    return head.dashboard_url


def served_lines(served: dict) -> dict[str, str]:
    """``model -> "champion vN, challenger vM"`` from :func:`shopsight.serving.deploy.status`'s ``served``."""
    lines = {}
    for kind, info in served.items():
        if "error" in info and "name" not in info:
            lines[kind] = f"unknown ({info['error']})"
            continue
        parts = [
            f"{alias} v{info[alias]['version']}" if info.get(alias) else f"{alias}: none"
            for alias in ("champion", "challenger")
        ]
        routing = []
        if info.get("canary_share"):
            routing.append(f"canary {info['canary_share']:.0%}")
        if info.get("shadow"):
            routing.append("shadow")
        text = f"{info['name']}: " + ", ".join(parts) + (f" ({', '.join(routing)})" if routing else "")
        if info.get("error"):
            text += f" [problem: {info['error']}]"
        lines[kind] = text
    return lines


@app.command("deploy")
def deploy_command(
    ctx: typer.Context,
    canary_share: Annotated[
        float | None,
        typer.Option(
            min=0, max=1, help="Share of requests for the challenger.", show_default="serving.canary_share"
        ),
    ] = None,
    shadow: Annotated[
        bool | None,
        typer.Option(
            "--shadow/--no-shadow",
            help="Score every request with the challenger too, logged only.",
            show_default="serving.shadow",
        ),
    ] = None,
) -> None:
    """Deploy the serving application (or update it in place): the champions of shopsight-next-item and
    shopsight-purchase behind an HTTP API, with live features from the Feast online store."""
    from shopsight.platform.mlflow_server import tracking_uri
    from shopsight.serving.deploy import deploy, status

    settings = state(ctx).settings
    dashboard = connect(settings, start=True)
    if not settings.serving.api_keys:
        err_console.print(
            "[yellow]warning:[/yellow] serving.api_keys is empty: every /v1 request will get 401. "
            "Make a key with `shopsight serve key TEAM`."
        )
    with spinner("deploying (each replica loads its champion)"):
        deployed = deploy(settings, canary_share=canary_share, shadow=shadow)
        info = status(settings)
    print_summary(
        "Serving",
        {
            "API": deployed.url,
            "API docs": deployed.docs,
            **served_lines(info["served"]),
            "MLflow UI": tracking_uri(settings),
            "Ray dashboard": dashboard or "-",
            "stop with": "shopsight serve shutdown",
        },
    )


@app.command("status")
def status_command(ctx: typer.Context, output: OutputOption = "table") -> None:
    """Show the application's status, its deployments' replicas and the model versions they serve.

    With a cluster named (serving.dashboard_url, or ray.address as a dashboard URL) it reads Serve's REST
    API on that dashboard; otherwise it joins this data directory's local Ray head.

    With -o json or yaml: application, status, message, deployments (a record each: name, status,
    replicas by state, message, and the target and autoscaling where Serve reports them), served (per
    task: the model, its champion and challenger, canary share, shadow; empty when read from a
    dashboard), dashboard (the one read, or null), api_docs (null when read from a dashboard).
    """
    from shopsight.serving.remote_status import remote_status, serve_dashboard, short_message

    settings = state(ctx).settings
    dashboard = serve_dashboard(settings)
    if dashboard:
        info = remote_status(settings, dashboard)
    else:
        from shopsight.serving.deploy import status

        connect(settings, start=False)
        info = status(settings)
    url = f"http://{settings.serving.host}:{settings.serving.port}"
    data = {
        "application": info["application"],
        "status": info["status"],
        "message": info.get("message") or None,
        "deployments": [{"name": name, **d} for name, d in info["deployments"].items()],
        "served": info.get("served") or {},
        "dashboard": info.get("dashboard") if dashboard else None,
        "api_docs": None if dashboard else f"{url}/docs",
    }

    def people() -> list:
        from rich.text import Text

        table = Table(title=f"Application {info['application']}: {info['status']}", title_justify="left")
        for column in ("deployment", "status", "replicas", "message"):
            table.add_column(column)
        for name, d in info["deployments"].items():
            replicas = ", ".join(f"{n} {s.lower()}" for s, n in d["replicas"].items()) or "-"
            if d.get("autoscaling"):
                auto = d["autoscaling"]
                replicas += (
                    f" (target {d.get('target_replicas')}, autoscaling {auto['min_replicas']}.."
                    f"{auto['max_replicas']} at {auto['target_ongoing_requests']:g} requests each)"
                )
            elif d.get("target_replicas") is not None:
                replicas += f" (target {d['target_replicas']})"
            table.add_row(name, d["status"], replicas, d["message"] or "")
        shown: list = [table]
        if info["message"]:
            shown.append(Text(f"message: {short_message(info['message'])}"))
        if dashboard:
            rows = {
                "Ray dashboard": info["dashboard"],
                "model versions": "GET /v1/models on the API (API key)",
            }
        else:
            rows = {**served_lines(info["served"]), "API docs": f"{url}/docs"}
        shown.append(summary_table("Served", rows))
        return shown

    emit(output, data, people)


@app.command("shutdown")
def shutdown_command(
    ctx: typer.Context,
    stop_ray: Annotated[
        bool,
        typer.Option(
            "--stop-ray/--no-stop-ray",
            help="Also stop the local Ray head, if `serve deploy` started it (a `cluster up` head stays: "
            "`shopsight cluster down` stops it).",
        ),
    ] = False,
) -> None:
    """Delete the serving application (and, with --stop-ray, the local Ray head deploy started)."""
    import ray

    from shopsight.serving.deploy import shutdown

    settings = state(ctx).settings
    connect(settings, start=False)
    stopped = shutdown(settings)
    console.print(
        f"serving application {settings.serving.app_name!r} " + ("deleted" if stopped else "was not deployed")
    )
    if stop_ray:
        from shopsight.platform.ray_cluster import local_head, stop_local_head

        ray.shutdown()
        head = local_head(settings)
        if head is None or head.started_by != SERVE_STARTED:
            console.print("the Ray head was not started by `shopsight serve deploy`: left running")
            return
        stop_local_head(settings)
        console.print("local Ray head stopped")


@app.command("key")
def key_command(
    team: Annotated[str, typer.Argument(help="Team name (lowercase letters, digits, _).")],
) -> None:
    """Make a new API key for a team: prints the key (give it to the team) and the setting that stores
    only its sha256 digest."""
    import re

    from shopsight.platform.api_keys import hash_key

    if not re.fullmatch(r"[a-z_][a-z0-9_]*", team):
        raise typer.BadParameter("use lowercase letters, digits and _ (it becomes a settings key)")
    key = secrets.token_urlsafe(32)
    # plain lines, not a table: a table narrower than the terminal would cut the key or the digest
    console.file.write(
        f"API key for {team}\nkey (shown once): {key}\nsetting: serving.api_keys.{team}={hash_key(key)}\n"
        f"YAML (--config): serving: {{api_keys: {{{team}: {hash_key(key)}}}}}\n"
    )


# ------------------------------------------------------------------------------------- the demo's stage


def ensure_champion(settings: Settings, client, name: str) -> str:
    """The champion version of ``name``; without one, the challenger goes through the gate like any
    promotion (recorded in the history, so that ``models rollback`` works later). A first champion is
    judged only on the candidate's own checks (it loads, takes the service's inputs, gives finite
    outputs), which nothing may override: a refusal stops the demo with the gate's reasons."""
    from shopsight.lifecycle.promotion import promote
    from shopsight.lifecycle.registry import CHALLENGER, CHAMPION, alias_version

    champion = alias_version(client, name, CHAMPION)
    if champion:
        return champion
    if alias_version(client, name, CHALLENGER) is None:
        raise ShopsightError(f"{name} has neither a {CHAMPION} nor a {CHALLENGER} to serve")
    result = promote(settings, name, log=note)
    if not result.promoted:
        raise PromotionRefused(
            f"{name}: the gate refused version {result.candidate}, so there is no {CHAMPION} to serve: "
            + "; ".join(result.reasons)
        )
    return str(result.candidate)


def _free_or(port: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_serving(
    settings: Settings, users: list[int], **serving_values
) -> tuple[dict[str, str], DemoServing]:
    """The demo's serving stage, on the Ray this process already runs: every served task's champion
    (promoted if needed), the application deployed with a one-off demo API key (and ``serving_values``
    set), a few requests of each route and their answers printed. Returns summary rows (URLs, key,
    versions) and what it deployed."""
    import requests
    from mlflow import MlflowClient

    from shopsight.platform.api_keys import hash_key
    from shopsight.platform.mlflow_server import tracking_uri
    from shopsight.serving.deploy import deploy
    from shopsight.training.tasks import served_tasks

    client = MlflowClient(tracking_uri(settings))
    tasks = served_tasks()
    versions = {t.registered_model: ensure_champion(settings, client, t.registered_model) for t in tasks}
    key = secrets.token_urlsafe(16)
    serving = settings.serving.model_copy(
        update={
            "api_keys": {**settings.serving.api_keys, "demo": hash_key(key)},
            "port": _free_or(settings.serving.port),
            **serving_values,
        }
    )
    settings = settings.model_copy(update={"serving": serving})
    with spinner("deploying the champions on Ray Serve (each replica loads its model)"):
        deployed = deploy(settings, log_level="WARNING")
    headers = {"X-API-Key": key}
    table = Table(title="A few requests and their answers", title_justify="left")
    for column in ("request", "answer", "model version"):
        table.add_column(column, overflow="fold")
    first_ranking = None
    for task in tasks:
        path = task.route.path
        ranking = task.route.predictor == "ranking"
        bodies = (
            [{"user_id": user, "k": 3} for user in (users[0], users[-1], 10**12)]
            if ranking
            else [{"user_ids": users[:3]}]
        )
        first_ranking = first_ranking or (path if ranking else None)
        for body in bodies:
            answer = requests.post(f"{deployed.url}{path}", json=body, headers=headers, timeout=30)
            answer.raise_for_status()
            data = answer.json()
            if ranking:
                shown = ", ".join(f"{i['item_id']} ({i['score']:.2f})" for i in data["items"])
                shown += f" [{data['source']} fallback]" if data["fallback"] else ""
            else:
                shown = ", ".join(f"{p['user_id']}: {p['probability']:.3f}" for p in data["predictions"])
            table.add_row(f"POST {path} {body}", shown, f"v{data['model']['version']}")
    console.print(table)
    rows = {
        "served": ", ".join(f"{name} v{version} (champion)" for name, version in versions.items()),
        "API docs": deployed.docs,
        "API key (demo)": key,
        "try": f"curl -H 'X-API-Key: {key}' -d '{{\"user_id\": {users[0]}, \"k\": 5}}' "
        f"{deployed.url}{first_ranking}",
        "Ray dashboard": _ray_dashboard() or "-",
    }
    return rows, DemoServing(settings, deployed.url, key)


@dataclass(frozen=True)
class DemoServing:
    """What the demo deployed: its settings, its URL and its one-off key."""

    settings: Settings
    url: str
    key: str


def _ray_dashboard() -> str | None:
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:  # noqa: BLE001 - no dashboard in this Ray
        return None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def stop_serving(settings: Settings, keep: bool) -> None:
    """End of the demo: keep serving until Ctrl-C or SIGTERM (``keep``), then delete the application and,
    after a signal, stop the servers the command started (its Ray ends with the process).

    The wait installs its own handlers: Ray Train leaves a SIGINT handler behind from the training stage
    that only logs "Gracefully aborting the training run", so the first Ctrl-C would otherwise be lost.
    """
    import signal
    import threading

    from shopsight.platform.mlflow_server import stop_servers_started_here
    from shopsight.serving.deploy import shutdown

    signalled = threading.Event()
    if keep:
        console.print("serving until Ctrl-C (the Ray of this process ends with it) ...")
        handlers = {
            sig: signal.signal(sig, lambda *_: signalled.set()) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            while not signalled.wait(0.5):  # short waits: the handlers run between them
                pass
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    if signalled.is_set():  # a user who pressed Ctrl-C waits for nothing graceful: all at once
        import ray

        stopping = threading.Thread(target=stop_servers_started_here, kwargs={"grace_s": 3.0})
        stopping.start()
        shutdown(settings, wait=False)
        ray.shutdown()  # this process's own Ray ends now, not at exit; from a shared one it disconnects
        stopping.join()
    else:
        shutdown(settings)
    console.print("serving stopped" + ("" if keep else " (run the demo with --keep-serving to keep it up)"))
