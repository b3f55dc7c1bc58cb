"""A submitted Spark build keeps the UI and event log its submission asks for, and the history server of
infra/k8s reads that log: spark-submit (local[1]) runs a driver that does what infra/spark/build_features.py
does before `features build` (read the submitted conf, create the event log folder, start the session with
build_spark), then the history server runs as the manifest runs it (`spark-class ...HistoryServer`,
configured by SPARK_HISTORY_OPTS) and lists the application. Everything listens on 127.0.0.1
(SPARK_LOCAL_IP), where the manifests' pods listen on every interface."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent(
    """
    import importlib.util, json, sys
    from shopsight.features._spark import build_spark, submitted_conf
    from shopsight.platform import load_settings

    spec = importlib.util.spec_from_file_location("build_features", sys.argv[1])
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    conf = submitted_conf()
    made = entry.prepare_event_log(conf)
    options = entry.submitted_settings(conf)
    overrides = dict(option.split("=", 1) for option in options[1::2])
    settings = load_settings(overrides={"data_dir": sys.argv[2], **overrides}, environ={}).settings
    session = build_spark(settings)
    session.range(100).selectExpr("sum(id)").collect()
    context = session.sparkContext
    seen = {"made": str(made), "master": settings.spark.master, "ui": context.uiWebUrl,
            "ui_enabled": context.getConf().get("spark.ui.enabled"), "app_id": context.applicationId}
    print(json.dumps(seen))
    session.stop()
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history_server_spec() -> dict:
    documents = yaml.safe_load_all((ROOT / "infra/k8s/base/spark-history-server.yaml").read_text())
    (deployment,) = [doc for doc in documents if doc and doc["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture
def spark_bin() -> Path:
    import pyspark

    folder = Path(pyspark.__file__).parent / "bin"
    if not (folder / "spark-submit").exists() or shutil.which("java") is None:
        pytest.skip("needs pyspark's spark-submit and Java")
    return folder


def test_a_submitted_build_keeps_its_ui_and_event_log_and_the_history_server_lists_it(spark_bin, tmp_path):
    events = tmp_path / "volume" / "spark-events"  # not there yet: the driver creates it
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    submit = subprocess.run(
        [str(spark_bin / "spark-submit"), "--master", "local[1]",
         "--conf", "spark.ui.enabled=true", "--conf", f"spark.ui.port={_free_port()}",
         "--conf", "spark.eventLog.enabled=true", "--conf", f"spark.eventLog.dir=file://{events}",
         "--conf", "spark.app.name=shopsight-features",
         str(driver),
         str(ROOT / "infra/spark/build_features.py"), str(tmp_path / "data")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr[-3000:]
    seen = json.loads(submit.stdout.strip().splitlines()[-1])
    assert seen["made"] == str(events) and seen["master"] == "local[1]"
    assert seen["ui_enabled"] == "true" and seen["ui"] and seen["ui"].startswith("http://")
    (log,) = events.iterdir()  # Spark 4 writes rolling logs: a folder eventlog_v2_<application id>
    assert log.name.endswith(seen["app_id"]) and log.stat().st_size > 0

    # the history server as the manifest runs it, on this log folder
    container = _history_server_spec()
    assert container["command"][-1] == "org.apache.spark.deploy.history.HistoryServer"
    opts = {var["name"]: var.get("value") for var in container["env"]}["SPARK_HISTORY_OPTS"]
    port = _free_port()
    opts = opts.replace("file:/data/spark-events", f"file:{events}")
    assert f"file:{events}" in opts, "the manifest's log directory is file:/data/spark-events"
    opts += f" -Dspark.history.ui.port={port}"
    server = subprocess.Popen(
        [str(spark_bin / Path(container["command"][0]).name), *container["command"][1:]],
        env={**env, "SPARK_HISTORY_OPTS": opts},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        import requests

        deadline = time.time() + 180
        apps: list = []
        while time.time() < deadline and not apps:
            assert server.poll() is None, server.stderr.read()[-3000:]
            with contextlib.suppress(requests.RequestException, ValueError):  # not up yet
                apps = requests.get(f"http://127.0.0.1:{port}/api/v1/applications", timeout=5).json()
            time.sleep(2)
        assert [(app["id"], app["name"]) for app in apps] == [(seen["app_id"], "shopsight-features")]
        assert all(attempt["completed"] for attempt in apps[0]["attempts"])
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_a_commands_own_spark_has_no_ui(spark):
    """Without spark-submit, Shopsight starts Spark itself: no UI, so no port beyond loopback's driver."""
    assert spark.sparkContext.uiWebUrl is None
    assert spark.sparkContext.getConf().get("spark.ui.enabled") == "false"
