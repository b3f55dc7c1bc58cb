"""The README's demo command, as a user runs it (on a smaller world to stay quick)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from shopsight.data.schema import TAOBAO_BEHAVIOR_MIX


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.feast
@pytest.mark.ray
@pytest.mark.mlflow
def test_demo_runs_every_stage(tmp_path):
    shopsight = shutil.which("shopsight", path=str(Path(sys.executable).parent)) or "shopsight"
    data_dir = tmp_path / "dd"
    command = [
        shopsight, "--data-dir", str(data_dir), "--set", "ray.num_cpus=2", "demo",
        "--users", "500", "--train-epochs", "5", "--purchase-epochs", "3", "--keep-serving",
    ]  # fmt: skip
    stderr = tmp_path / "stderr.log"
    try:
        with stderr.open("w") as err:
            demo = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "COLUMNS": "200"}
            )
            lines: list[str] = []
            reader = threading.Thread(
                target=lambda: lines.extend(iter(demo.stdout.readline, "")), daemon=True
            )
            reader.start()
            deadline = time.time() + 1500
            while not any("serving until Ctrl-C" in line for line in lines):
                assert demo.poll() is None and time.time() < deadline, "".join(lines) + stderr.read_text()
                time.sleep(1)
            out = "".join(lines)
            summary = _summary(out)
            # the command the demo prints, run as it is printed (curl -d sends a form content-type)
            tried = subprocess.run(shlex.split(summary["try"]), capture_output=True, text=True, timeout=60)
            assert tried.returncode == 0 and '"items"' in tried.stdout, tried.stdout + tried.stderr
            # one Ctrl-C stops serving and every server the demo started, within 10 s
            url = summary["API docs"].rsplit("/", 1)[0]
            demo.send_signal(signal.SIGINT)
            started = time.time()
            demo.wait(timeout=10)
            stopped_in = time.time() - started
            reader.join(timeout=5)
    finally:
        if demo.poll() is None:
            demo.kill()
        from shopsight.platform import load_settings
        from shopsight.platform.mlflow_server import local_server, stop_local_server

        settings = load_settings(overrides={"data_dir": str(data_dir)}, environ={}).settings
        mlflow_left = local_server(settings).running
        stop_local_server(settings)
    assert demo.returncode == 0 and stopped_in < 10, "".join(lines) + stderr.read_text()
    assert "serving stopped" in "".join(lines)
    while time.time() < started + 10 and _answers(url):  # the process is gone; Ray's proxy goes with it
        time.sleep(0.2)
    assert not _answers(url), f"{url} still answers 10 s after Ctrl-C"
    assert not mlflow_left, "the MLflow server the demo started is stopped with it"
    stages = (
        "1. data: simulate",
        "2. data: validate",
        "3. features",
        "4. features",
        "5. training",
        "6. training: LSTM purchase model",
        "7. training: LSTM churn model (churn_3d)",
        "8. serving",
        "POST /v1/churn-risk",
    )
    for stage in stages:
        assert stage in out, stage
    assert "Demo finished" in out and "Feature catalog" in out and "user_profile_v1" in out
    rows = {
        line.split("│")[1].strip(): line.split("│")[2:4] for line in out.splitlines() if line.count("│") == 4
    }
    for behavior, real in TAOBAO_BEHAVIOR_MIX.items():
        simulated, taobao = (float(cell) for cell in rows[behavior])
        assert taobao == real and abs(simulated - real) < 1.0
    assert summary["rejected rows"] == "0"
    assert (
        summary["good rows"] == summary["rows read"] and int(summary["good rows"].replace(",", "")) > 20_000
    )
    events = data_dir / "demo" / "simulated" / "events"
    assert len(list(events.glob("day=*"))) == 9
    assert len(list((data_dir / "features" / "user_activity").glob("snapshot_day=*"))) == 8
    sampled, full = summary["test HR@10 sampled / full"].split(" (")[0].split(" / ")
    popular = summary["test HR@10 sampled / full"].split("popularity ")[1].rstrip(")").split(" / ")
    assert float(sampled) > float(popular[0]), "the sequence model beats popularity on the simulator's data"
    assert "challenger" in summary["next-item model"]
    assert "challenger" in summary["purchase model"]
    # "0.71 (trees 0.70, oracle 0.79)": the model learns something; the oracle is the ceiling
    model_auc = float(summary["purchase test ROC-AUC"].split(" (")[0])
    baselines = dict(
        part.split(" ") for part in summary["purchase test ROC-AUC"].split(" (")[1].rstrip(")").split(", ")
    )
    assert 0.6 < model_auc <= float(baselines["oracle"]) + 0.03
    # every task on user snapshots goes through the same table: churn as purchase, calibrated too
    assert "challenger" in summary["churn model"]
    churn_auc = float(summary["churn test ROC-AUC"].split(" (")[0])
    churn_baselines = dict(
        part.split(" ") for part in summary["churn test ROC-AUC"].split(" (")[1].rstrip(")").split(", ")
    )
    assert 0.6 < churn_auc <= float(churn_baselines["oracle"]) + 0.03
    for task in ("purchase", "churn"):
        ece = float(summary[f"{task} calibration"].split("ECE ")[1].split(" ")[0])
        before = float(summary[f"{task} calibration"].split("before calibration ")[1].split(")")[0])
        assert ece < before, f"{task}: calibration lowers the calibration error ({ece} vs {before})"
    assert "shopsight-churn v" in summary["served"]


def _summary(out: str) -> dict[str, str]:
    """The rows of the demo's final summary table."""
    return {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in out.splitlines()
        if line.count("│") == 3
    }


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
        return True
    except requests.ConnectionError:
        return False
