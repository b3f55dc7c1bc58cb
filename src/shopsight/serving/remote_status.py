"""The serving application's status from Ray Serve's REST API on a cluster's dashboard.

``shopsight serve status`` on a machine outside the cluster (the ``cluster`` profile, a port-forward to a
KubeRay RayService) cannot join the cluster's Ray: its addresses are the dashboard's only. The dashboard
serves Serve's state at ``GET /api/serve/applications/`` (Ray's ``ServeInstanceDetails``: applications,
their deployments, each deployment's config, target and replicas), behind Ray's token authentication
like the Jobs API. This reads it without importing Ray Serve, and returns the shape of
:func:`shopsight.serving.deploy.status` less the served model versions, which only the application
itself knows (``GET /v1/models``, with an API key).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from shopsight.platform import Settings, ShopsightError
from shopsight.platform.ray_cluster import dashboard_endpoint

APPLICATIONS_PATH = "/api/serve/applications/"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def serve_dashboard(settings: Settings) -> str | None:
    """The dashboard to read the serving status from: ``serving.dashboard_url``, else ``ray.address`` when
    it is a dashboard URL; ``None``: no cluster is named, the local head is joined instead."""
    if settings.serving.dashboard_url:
        return settings.serving.dashboard_url
    address = settings.ray.address or ""
    return address if address.startswith(("http://", "https://")) else None


def remote_status(settings: Settings, address: str, timeout_s: float = 30) -> dict:
    """The status of ``serving.app_name`` on the Ray cluster whose dashboard is ``address``.

    Raises:
        ShopsightError: the dashboard is unreachable or refuses the token, or the application is not
            deployed there.
    """
    endpoint = dashboard_endpoint(settings, address)
    payload = endpoint.get_json(APPLICATIONS_PATH, timeout_s=timeout_s)
    return parse_applications(payload, settings.serving.app_name, endpoint.address)


def parse_applications(payload: dict, app_name: str, where: str) -> dict:
    """One application of a ``GET /api/serve/applications/`` answer, as :func:`remote_status` returns it.

    Raises:
        ShopsightError: the answer has no application ``app_name``.
    """
    applications = payload.get("applications") or {}
    app = applications.get(app_name)
    if app is None:
        others = f" (it runs: {', '.join(sorted(applications))})" if applications else ""
        raise ShopsightError(
            f"no serving application {app_name!r} is deployed on the Ray cluster at {where}{others}"
        )
    return {
        "application": app_name,
        "status": str(app.get("status", "UNKNOWN")),
        "message": short_message(app.get("message")),
        "deployments": {
            name: _deployment(deployment) for name, deployment in (app.get("deployments") or {}).items()
        },
        "served": {},
        "dashboard": where,
    }


def _deployment(deployment: dict) -> dict[str, Any]:
    config = deployment.get("deployment_config") or {}
    auto = config.get("autoscaling_config")
    states = Counter(str(replica.get("state", "UNKNOWN")) for replica in deployment.get("replicas") or [])
    return {
        "status": str(deployment.get("status", "UNKNOWN")),
        "replicas": dict(sorted(states.items())),
        "message": short_message(deployment.get("message")),
        "target_replicas": deployment.get("target_num_replicas"),
        "autoscaling": (
            {key: auto.get(key) for key in ("min_replicas", "max_replicas", "target_ongoing_requests")}
            if auto
            else None
        ),
    }


def short_message(message: Any) -> str:
    """Serve's messages can hold a whole traceback with terminal colours: its last line says what broke."""
    lines = [line.strip() for line in _ANSI.sub("", str(message or "")).splitlines() if line.strip()]
    if not lines:
        return ""
    first, last = lines[0], lines[-1][:300]
    if len(lines) == 1:
        return first if len(first) <= 400 else first[:399] + "…"
    return f"{first if len(first) <= 200 else first[:199] + '…'} ... {last}"
