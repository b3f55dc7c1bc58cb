"""`shopsight cluster up | down | status`: the local profile's Ray head (jobs go there)."""

from __future__ import annotations

import typer

from shopsight.cli._context import state
from shopsight.cli._output import OutputOption, emit
from shopsight.platform import ShopsightError, console, print_summary, spinner, summary_table
from shopsight.platform.ray_cluster import local_head, start_local_head, stop_local_head

app = typer.Typer(
    help="Start, inspect and stop the local Ray head that `shopsight jobs` submits to (local profile).",
    no_args_is_help=True,
)


@app.command("up")
def up_command(ctx: typer.Context) -> None:
    """Start a Ray head on this machine (token authentication on), or reuse the running one."""
    settings = state(ctx).settings
    with spinner("starting the local Ray head"):
        head, started = start_local_head(settings)
    print_summary(
        "Ray head " + ("started" if started else "already running"),
        {
            "Jobs API / dashboard": head.dashboard_url,
            "listens on": f"127.0.0.1 only (GCS {head.gcs_address}): nodes of other machines join a cluster "
            "of the `cluster` profile (docs/cluster.md)",
            "token": head.token_path,
            "submit work": "shopsight jobs submit train --data ...",
        },
    )


@app.command("status")
def status_command(ctx: typer.Context, output: OutputOption = "table") -> None:
    """Whether the local head runs, its nodes and their resources; exit 1 when it is down.

    With -o json or yaml: address (the profile's cluster, or null for the local head), running (true,
    false, or null for a profile's cluster, which this command does not inspect), dashboard_url,
    gcs_address, token_path, nodes (a record each: node_id, role, ip, resources), nodes_error.
    """
    settings = state(ctx).settings
    data: dict = {
        "address": settings.ray.address or None,
        "running": None,
        "dashboard_url": None,
        "gcs_address": None,
        "token_path": None,
        "nodes": [],
        "nodes_error": None,
    }
    if settings.ray.address:
        emit(
            output,
            data,
            lambda: f"this profile uses the cluster at {settings.ray.address} (`shopsight jobs list`)",
        )
        return
    head = local_head(settings)
    if head is None:
        emit(output, {**data, "running": False}, lambda: _NOT_RUNNING)
        raise typer.Exit(1)
    data.update(
        running=True,
        dashboard_url=head.dashboard_url,
        gcs_address=head.gcs_address,
        token_path=head.token_path,
    )
    try:
        data["nodes"] = _nodes(head.dashboard_url, head.token_path)
    except ShopsightError as exc:
        data["nodes_error"] = str(exc)

    def people():
        summary = {
            "Jobs API / dashboard": head.dashboard_url,
            "GCS": head.gcs_address,
            "token": head.token_path,
        }
        for i, node in enumerate(data["nodes"]):
            resources = ", ".join(f"{k} {v:g}" for k, v in node["resources"].items())
            summary[f"node {i}"] = f"{node['node_id'][:12]} ({node['role']}, {node['ip']}): {resources}"
        if data["nodes_error"]:
            summary["nodes"] = data["nodes_error"]
        return summary_table("local Ray head: running", summary)

    emit(output, data, people)


_NOT_RUNNING = "local Ray head: not running (`shopsight cluster up` starts it)"


def _nodes(dashboard_url: str, token_path: str) -> list[dict]:
    """Alive nodes and their resources, from the dashboard's State API."""
    from pathlib import Path

    import requests

    token = Path(token_path).read_text().strip()
    try:
        response = requests.get(
            f"{dashboard_url}/api/v0/nodes",
            params={"detail": "1", "limit": "100"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        response.raise_for_status()
    except requests.RequestException as exc:
        raise ShopsightError(f"cannot list nodes: {exc}") from None
    nodes = []
    for node in response.json()["data"]["result"]["result"]:
        if node.get("state") != "ALIVE":
            continue
        resources = {
            k: v for k, v in sorted(node.get("resources_total", {}).items())
            if not k.startswith(("node:", "memory", "object_store_memory"))
        }  # fmt: skip
        role = "head" if node.get("is_head_node") else "worker"
        nodes.append(
            {"node_id": node["node_id"], "role": role, "ip": node.get("node_ip"), "resources": resources}
        )
    return nodes


@app.command("down")
def down_command(ctx: typer.Context) -> None:
    """Stop the local head this data directory started (other Ray clusters on the machine are left alone)."""
    settings = state(ctx).settings
    stopped = stop_local_head(settings)
    console.print("local Ray head stopped" if stopped else "no local Ray head was running")
