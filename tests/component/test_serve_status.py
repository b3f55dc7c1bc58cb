"""`shopsight serve status` against a real Ray head through Serve's REST API, as it reads a KubeRay
RayService's: a head with token authentication on loopback (what `shopsight cluster up` starts), a tiny
autoscaled Serve application deployed on it by another process, and the command given only the dashboard's
URL and the token file. The command runs as a subprocess and never joins the cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from shopsight.platform import load_settings
from shopsight.platform.ray_cluster import start_local_head, stop_local_head

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.timeout(600)]

# Runs in its own process: joins the head with its token, deploys, and exits. Serve's controller is a
# detached actor, so the application keeps running on the head after this driver is gone.
DEPLOY = textwrap.dedent(
    """
    import sys
    from ray import serve
    from shopsight.platform.ray_cluster import Head, join_head

    join_head(Head(sys.argv[1], sys.argv[2], sys.argv[3], "test"), log_to_driver=False, logging_level="ERROR")

    @serve.deployment(
        ray_actor_options={"num_cpus": 0},
        autoscaling_config={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4},
    )
    class Echo:
        def __call__(self, request):
            return "ok"

    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[4])})
    serve.run(Echo.bind(), name="shopsight", route_prefix="/")
    """
)


def _shopsight(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shopsight", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "250"},
        timeout=120,
    )


@pytest.fixture
def serving_head(tmp_path, free_port):
    settings = load_settings(
        overrides={
            "data_dir": str(tmp_path / "data"),
            "ray.head_port": str(free_port()),
            "ray.dashboard_port": str(free_port()),
            "ray.num_cpus": "1",
        },
        environ={},
    ).settings
    head, _ = start_local_head(settings)
    try:
        deployed = subprocess.run(
            [sys.executable, "-c", DEPLOY, head.gcs_address, head.dashboard_url, head.token_path,
             str(free_port())],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        yield head
    finally:
        stop_local_head(settings)


def test_serve_status_reads_the_cluster_through_the_dashboard_with_the_token(serving_head, tmp_path):
    config = tmp_path / "remote.yaml"
    remote = {"data_dir": str(tmp_path / "elsewhere")}  # not the head's data directory: nothing local
    remote["ray"] = {"address": serving_head.dashboard_url, "auth_token_path": serving_head.token_path}
    config.write_text(yaml.safe_dump(remote))
    result = _shopsight(config, "serve", "status")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines()]
    assert "Application shopsight: RUNNING" in result.stdout
    assert ["Echo", "HEALTHY", "1 running (target 1, autoscaling 1..3 at 4 requests each)", ""] in rows
    assert ["Ray dashboard", serving_head.dashboard_url] in rows

    (tmp_path / "wrong").write_text("not-the-token\n")
    remote["ray"]["auth_token_path"] = str(tmp_path / "wrong")
    config.write_text(yaml.safe_dump(remote))
    refused = _shopsight(config, "serve", "status")
    assert refused.returncode == 1
    assert (
        "invalid token" in refused.stderr + refused.stdout and "HTTP 403" in refused.stderr + refused.stdout
    )

    remote["ray"]["auth_token_path"] = serving_head.token_path
    remote["serving"] = {"app_name": "nothing-here"}
    config.write_text(yaml.safe_dump(remote))
    missing = _shopsight(config, "serve", "status")
    assert missing.returncode == 1
    assert "no serving application 'nothing-here'" in " ".join((missing.stderr + missing.stdout).split())
