"""`serve status` through Serve's REST API: reading a real answer, and the token header.

``data/serve_applications.json`` is what ``GET /api/serve/applications/`` answered on a Ray 2.60 head (token
authentication on) running two applications: ``shopsight``, one autoscaled deployment with a running
replica, and ``other``, whose constructor raised (local paths in its traceback shortened). The same call
against a live head: tests/component/test_serve_status.py.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shopsight.platform import ShopsightError, load_settings
from shopsight.serving.remote_status import (
    APPLICATIONS_PATH,
    parse_applications,
    remote_status,
    serve_dashboard,
    short_message,
)

CAPTURED = json.loads((Path(__file__).parent / "data" / "serve_applications.json").read_text())


def test_a_running_autoscaled_application_reads_as_its_deployments_and_replicas():
    info = parse_applications(CAPTURED, "shopsight", "http://head:8265")
    assert info["status"] == "RUNNING" and info["message"] == ""
    assert info["deployments"] == {
        "Echo": {
            "status": "HEALTHY",
            "replicas": {"RUNNING": 1},
            "message": "",
            "target_replicas": 1,
            "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4.0},
        }
    }
    assert info["served"] == {} and info["dashboard"] == "http://head:8265"


def test_a_failed_deployment_says_what_broke_in_one_line():
    info = parse_applications(CAPTURED, "other", "http://head:8265")
    assert info["status"] == "DEPLOY_FAILED"
    broken = info["deployments"]["Broken"]
    assert broken["status"] == "DEPLOY_FAILED" and broken["replicas"] == {} and broken["autoscaling"] is None
    message = broken["message"]
    assert message.startswith("The deployment failed to start 1 times in a row")
    assert message.endswith("RuntimeError: no champion could be loaded")
    assert "\n" not in message and "\x1b" not in message and "File " not in message


def test_an_application_that_is_not_deployed_is_an_error_naming_those_that_are():
    with pytest.raises(
        ShopsightError, match=r"no serving application 'missing' .* \(it runs: other, shopsight\)"
    ):
        parse_applications(CAPTURED, "missing", "http://head:8265")
    # the answer of a head where Serve never started, as captured with the rest
    with pytest.raises(ShopsightError, match="no serving application 'shopsight' is deployed"):
        parse_applications({"controller_info": {}, "proxies": {}, "applications": {}}, "shopsight", "x")


def test_short_message_keeps_a_one_line_message_and_cuts_long_ones():
    assert short_message(None) == "" and short_message("Deploying.") == "Deploying."
    assert len(short_message("x" * 1000)) == 400


def test_the_dashboard_is_the_serving_setting_then_a_dashboard_ray_address():
    def dashboard(**overrides):
        return serve_dashboard(load_settings(overrides=overrides, environ={}).settings)

    assert dashboard() is None  # local: the head of this data directory is joined
    assert dashboard(**{"ray.address": "ray://head:10001"}) is None
    assert dashboard(**{"ray.address": "http://head:8265"}) == "http://head:8265"
    assert (
        dashboard(**{"ray.address": "http://head:8265", "serving.dashboard_url": "http://serve-head:8265"})
        == "http://serve-head:8265"
    )
    cluster = load_settings(profile="cluster", environ={}).settings
    assert serve_dashboard(cluster) == "http://shopsight-serve-head-svc:8265"  # the RayService's head


class _Dashboard(BaseHTTPRequestHandler):
    """Ray's dashboard as token authentication makes it answer: 401 without a token, 403 with another."""

    token = "s3cret-token"

    def do_GET(self):  # noqa: N802 - http.server's name
        sent = self.headers.get("Authorization")
        if sent is None:
            self._answer(401, b"Unauthorized: Missing authentication token")
        elif sent != f"Bearer {self.token}":
            self._answer(403, b"Forbidden: Invalid authentication token")
        elif self.path == APPLICATIONS_PATH:
            self._answer(200, json.dumps(CAPTURED).encode())
        else:
            self._answer(404, b"Not Found")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def dashboard():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _settings(tmp_path, token: str | None):
    overrides = {"data_dir": str(tmp_path / "data")}
    if token is not None:
        (tmp_path / "token").write_text(token + "\n")
        overrides["ray.auth_token_path"] = str(tmp_path / "token")
    return load_settings(overrides=overrides, environ={}).settings


def test_remote_status_sends_the_token_and_names_a_refused_one(dashboard, tmp_path):
    info = remote_status(_settings(tmp_path, _Dashboard.token), dashboard + "/")
    assert info["status"] == "RUNNING" and info["dashboard"] == dashboard
    with pytest.raises(ShopsightError, match=r"invalid token: .* refused the token in .*token \(HTTP 403\)"):
        remote_status(_settings(tmp_path, "another"), dashboard)
    with pytest.raises(
        ShopsightError, match=r"invalid token: .* requires a token and none was sent \(HTTP 401\)"
    ):
        remote_status(_settings(tmp_path / "none", None), dashboard)
    with pytest.raises(ShopsightError, match="cannot reach the Ray cluster at http://127.0.0.1:9"):
        remote_status(_settings(tmp_path, _Dashboard.token), "http://127.0.0.1:9", timeout_s=5)
    with pytest.raises(ShopsightError, match="not a Ray dashboard URL"):
        remote_status(_settings(tmp_path, _Dashboard.token), "ray://head:10001")
