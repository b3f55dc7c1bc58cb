"""The README's demo command, as a user runs it (on a smaller world to stay quick)."""

from __future__ import annotations

import os
import re
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
        "1/9 data: simulate",
        "2/9 data: validate",
        "3/9 features",
        "4/9 features",
        "5/9 training",
        "6/9 training: LSTM purchase",
        "7/9 training: LSTM churn (churn_3d)",
        "8/9 serving",
        "POST /v1/churn-risk",
        "9/9 monitoring",
    )
    for stage in stages:
        assert stage in out, stage
    assert "Demo finished" in out and "user_profile_v1" in out
    # quiet: what the engines say is in the log file, and the console fits on two screens
    said = out + stderr.read_text()
    for noise in ("log4j", "netlib", "WARN", "DeprecationWarning", "(raylet)", "pid=", "PreemptionWatcher"):
        assert noise not in said, noise
    assert len([line for line in said.splitlines() if line.strip()]) <= 100, said
    log = (data_dir / "logs" / "shopsight.log").read_text()
    assert "log4j" in log and "Started a local Ray instance" in log
    assert summary["logs"] == str(data_dir / "logs" / "shopsight.log")

    read, rejected = re.search(r"([\d,]+) rows read, ([\d,]+) rejected", out).groups()
    assert rejected == "0" and int(read.replace(",", "")) > 20_000
    mix = re.search(r"behaviour mix, % of events: (.*) \(Taobao (.*)\)", out).groups()
    simulated, taobao = ({b: float(v) for b, v in re.findall(r"(\w+) ([\d.]+)", part)} for part in mix)
    for behavior, real in TAOBAO_BEHAVIOR_MIX.items():
        assert taobao[behavior] == real and abs(simulated[behavior] - real) < 1.0
    events = data_dir / "demo" / "simulated" / "events"
    assert len(list(events.glob("day=*"))) == 9 + 1  # the loop simulates the day after the answers
    assert len(list((data_dir / "features" / "user_activity").glob("snapshot_day=*"))) == 9
    sampled, full, popular, popular_full = (
        float(v)
        for v in re.search(
            r"shopsight-next-item v\d+ \(challenger\): test HR@10 ([\d.]+), full ranking ([\d.]+) "
            r"\(popularity ([\d.]+) / ([\d.]+)\)",
            out,
        ).groups()
    )
    assert sampled > popular, "the sequence model beats popularity on the simulator's data"
    # "0.71 (trees 0.70, oracle 0.79)": the model learns something; the oracle is the ceiling. Every task
    # on user snapshots goes through the same table: churn as purchase, calibrated too
    for task in ("purchase", "churn"):
        auc, trees, oracle, ece, before = (
            float(v)
            for v in re.search(
                rf"shopsight-{task} v\d+ \(challenger\): test ROC-AUC ([\d.]+) \(trees ([\d.]+), "
                r"oracle ([\d.]+)\), ECE ([\d.]+) \(uncalibrated ([\d.]+)\)",
                out,
            ).groups()
        )
        assert 0.6 < auc <= oracle + 0.03 and trees > 0.5, task
        assert ece < before, f"{task}: calibration lowers the calibration error ({ece} vs {before})"
    assert "shopsight-churn v" in summary["served"]
    # the loop: the champion and the canary judged on the next day's purchases, with intervals
    online = dict(re.findall(r"purchase v\d+ (champion|canary): online roc_auc ([\d.]+) \[", out))
    assert set(online) == {"champion", "canary"} and all(0.5 < float(v) <= 1 for v in online.values()), out
    assert re.search(r"purchase canary - champion: [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\]", out), out
    assert "most drifted features (PSI)" in out
    assert summary["monitoring run"].startswith("http") and Path(summary["monitor report"]).exists()


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
