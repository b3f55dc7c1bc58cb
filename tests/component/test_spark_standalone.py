"""A feature job against a real Spark standalone cluster (the master and worker of pip's pyspark, started
with `spark-class` on loopback) writes the same features as local mode."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import requests

DAYS = ("2017-11-27", "2017-11-29")


def _spark_class() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


@pytest.fixture
def spark_standalone(tmp_path, free_port):
    """A master and a one-core worker on 127.0.0.1; yields the master URL; both stopped at the end."""
    env = {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,  # the worker's Python processes must import this venv's packages
        "SPARK_LOG_DIR": str(tmp_path / "logs"),
        "SPARK_WORKER_DIR": str(tmp_path / "work"),
    }
    port, ui = free_port(), free_port()
    logs = open(tmp_path / "spark.log", "w")  # noqa: SIM115 - closed at the end of the fixture
    master = subprocess.Popen(
        [_spark_class(), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
         "--webui-port", str(ui)],
        env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"spark://127.0.0.1:{port}"
    worker = subprocess.Popen(
        [_spark_class(), "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1", "--cores", "1",
         "--memory", "2g", "--webui-port", str(free_port()), "--work-dir", str(tmp_path / "work")],
        env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{ui}/json/", timeout=2).json().get("aliveworkers") == 1:
                    break
            except (requests.RequestException, ValueError):
                pass
            if time.time() > deadline or master.poll() is not None or worker.poll() is not None:
                log = (tmp_path / "spark.log").read_text()
                pytest.fail(f"the Spark standalone cluster did not come up: {log}")
            time.sleep(1)
        yield url, ui
    finally:
        for process in (worker, master):
            os.killpg(process.pid, 15)
            process.wait(timeout=30)
        logs.close()


def _build(taobao_sample: Path, data_dir: Path, master: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shopsight", "--data-dir", str(data_dir), "--set", f"spark.master={master}",
         "--set", "spark.shuffle_partitions=4", "features", "build", "--data", str(taobao_sample),
         "--start", DAYS[0], "--end", DAYS[1]],
        capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def _sortable(value) -> bool:
    return isinstance(value, str) or not hasattr(value, "__len__")  # arrays (sequences) do not sort


def _tables(folder: Path) -> dict[str, pd.DataFrame]:
    tables = {}
    for table in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        frame = pd.read_parquet(table)
        frame = frame[sorted(frame.columns)]
        keys = [c for c in frame.columns if frame[c].map(_sortable).all()]
        tables[table.name] = frame.sort_values(keys).reset_index(drop=True)
    return tables


def test_feature_job_on_a_standalone_cluster_matches_local_mode(spark_standalone, taobao_sample, tmp_path):
    master, ui = spark_standalone
    on_cluster = _build(taobao_sample, tmp_path / "cluster", master)
    assert on_cluster.returncode == 0, on_cluster.stdout + on_cluster.stderr
    apps = requests.get(f"http://127.0.0.1:{ui}/json/", timeout=5).json()["completedapps"]
    assert any(app["name"] == "shopsight-features" for app in apps), apps  # it really ran on the cluster
    local = _build(taobao_sample, tmp_path / "local", "local[2]")
    assert local.returncode == 0, local.stdout + local.stderr

    cluster_tables = _tables(tmp_path / "cluster" / "features")
    local_tables = _tables(tmp_path / "local" / "features")
    assert set(cluster_tables) == set(local_tables) and len(cluster_tables) >= 4, sorted(cluster_tables)
    for name, frame in local_tables.items():
        assert len(frame) > 0, name
        pd.testing.assert_frame_equal(cluster_tables[name], frame, check_exact=False, rtol=1e-9, obj=name)
