"""`shopsight cluster` and `shopsight jobs` against a real two-node Ray cluster on this machine.

The head comes from `shopsight cluster up` (token authentication on); a second node joins it with
`ray start --address` (its own temp dir, so the two raylets do not share runtime-env folders). Each node
offers one `trainer` resource and each Ray Train worker needs one, so a 2-worker job must put one worker on
each node. Commands run as subprocesses: the jobs commands are what a user types, and this test process
stays out of the cluster's Ray session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shopsight.platform import load_settings
from shopsight.platform.ray_cluster import (
    WorkerNode,
    local_head,
    ray_temp_dir,
    start_worker_node,
    stop_worker_node,
)

pytestmark = pytest.mark.timeout(1500)


def _shopsight(*args: str, config: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shopsight", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "250"},
        timeout=timeout,
    )


class _Cluster:
    """The head of `shopsight cluster up` plus worker nodes joined with `ray start --address`."""

    def __init__(self, root: Path, free_port) -> None:
        self.root = root
        self.config = root / "settings.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "data_dir": str(root / "data"),
                    "ray": {
                        "head_port": free_port(),
                        "dashboard_port": free_port(),
                        "num_cpus": 1,
                        "head_resources": {"trainer": 1},
                        "worker_resources": {"trainer": 1},
                        "storage_path": str(root / "shared"),
                    },
                }
            )
        )
        self.settings = load_settings(config_file=self.config, environ={}).settings
        self.free_port = free_port
        self.workers: list[WorkerNode] = []

    def up(self) -> str:
        result = _shopsight("cluster", "up", config=self.config)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def join(self) -> WorkerNode:
        """Start a worker node with one CPU and one `trainer`."""
        head = local_head(self.settings)
        assert head is not None
        node = start_worker_node(head, num_cpus=1, resources={"trainer": 1})
        self.workers.append(node)
        return node

    def nodes(self) -> dict[str, bool]:
        """node id -> is head, of the nodes alive now."""
        from shopsight.cli.cluster import _nodes

        head = json.loads((self.root / "data" / "ray" / "head.json").read_text())
        nodes = _nodes(head["dashboard_url"], head["token_path"])
        return {node["node_id"][:12]: node["role"] == "head" for node in nodes}

    def down(self) -> None:
        _shopsight("cluster", "down", config=self.config)
        from shopsight.platform.mlflow_server import stop_local_server

        stop_local_server(self.settings)
        for node in self.workers:
            stop_worker_node(node)  # (a no-op for nodes already gone but for their temp dir)


def _job_id(output: str | subprocess.CompletedProcess) -> str:
    """The job id `jobs submit` printed (given its result: its stderr says why where there is none)."""
    said = output if isinstance(output, str) else output.stdout
    match = re.search(r"shopsight-\w+-\d{8}-\d{6}-[0-9a-f]{6}", said)
    assert match, (
        said if isinstance(output, str) else f"exit {output.returncode}: {output.stdout}{output.stderr}"
    )
    return match.group(0)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def cluster(tmp_path, free_port):
    cluster = _Cluster(tmp_path, free_port)
    cluster.up()
    yield cluster
    cluster.down()


@pytest.mark.chaos
def test_two_node_training_job_spreads_workers_and_survives_a_node_restart(cluster, sasrec_games, record):
    data = cluster.root / "games-head.txt"
    with open(sasrec_games) as source:
        data.write_text("".join(line for _, line in zip(range(30_000), source, strict=False)))
    # the head's session is this data directory's alone: another one on this machine never finds it
    assert (ray_temp_dir(cluster.settings) / "session_latest").is_dir()
    other = load_settings(overrides={"data_dir": str(cluster.root / "other")}, environ={}).settings
    assert ray_temp_dir(other) != ray_temp_dir(cluster.settings)
    node = cluster.join()
    nodes = cluster.nodes()
    assert len(nodes) == 2 and sum(nodes.values()) == 1, nodes
    status = _shopsight("cluster", "status", config=cluster.config)
    assert status.returncode == 0 and "trainer 1" in status.stdout

    submit = _shopsight(
        "jobs", "submit", "train", "--data", str(data), "--workers", "2", "--epochs", "10",
        "--eval-every", "1", "--name", "two-nodes", config=cluster.config,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job = _job_id(submit.stdout)
    assert f"shopsight jobs logs {job} --follow" in submit.stdout

    def log() -> str:
        return _shopsight("jobs", "logs", job, config=cluster.config).stdout

    _wait_for(lambda: "epoch   3" in log(), 600, "epoch 3 of the job")
    placed = dict(re.findall(r"worker rank (\d) of 2 on node ([0-9a-f]+)", log()))
    assert set(placed) == {"0", "1"} and placed["0"] != placed["1"], placed  # one worker per node
    assert {node[:12] for node in placed.values()} == set(nodes)
    # the second node dies mid-run (its raylet and every worker on it), and comes back as a new node
    assert stop_worker_node(node, remove=False) > 0
    stopped = time.perf_counter()
    _wait_for(lambda: len(cluster.nodes()) == 1, 120, "the head to declare the node dead")
    cluster.join()
    _wait_for(lambda: "resumes after epoch" in log(), 600, "the workers to resume")
    resumed_after_s = time.perf_counter() - stopped

    done = _shopsight("jobs", "status", job, "--wait", "--timeout", "900", config=cluster.config, timeout=960)
    final_log = log()
    assert done.returncode == 0 and "SUCCEEDED" in done.stdout, done.stdout + final_log[-3000:]
    resumed = [int(k) for k in re.findall(r"worker rank 0 resumes after epoch (\d+)", final_log)]
    assert resumed and min(resumed) >= 2, "the restarted group did not resume from a checkpoint"
    epochs = [int(e) for e in re.findall(r"epoch +(\d+)  loss", final_log)]
    assert max(epochs) == 10
    # after the restart, epochs continue from the checkpoint: none before it is trained again
    after_restart = final_log[final_log.index("resumes after epoch") :]
    assert min(int(e) for e in re.findall(r"epoch +(\d+)  loss", after_restart)) == min(resumed) + 1
    checkpoints = list((cluster.root / "shared" / "two-nodes").glob("checkpoint_*"))
    assert checkpoints, "no checkpoint in the shared storage path"
    record(
        in_flight="1 job, 2 workers on 2 nodes, 10 epochs",
        lost=len(epochs) - len(set(epochs)),  # epochs trained twice
        recovered=len(set(epochs)),
        seconds_to_recover=round(resumed_after_s, 1),
    )

    listing = _shopsight("jobs", "list", config=cluster.config)
    assert job in listing.stdout and "SUCCEEDED" in listing.stdout


def test_bad_submissions_fail_at_submit_time_and_a_failed_job_says_why(cluster, tmp_path, free_port):
    def submit(*args: str, config: Path = cluster.config) -> subprocess.CompletedProcess:
        return _shopsight("jobs", "submit", *args, config=config)

    for args, message in [
        (("nope",), "unknown job kind 'nope'"),
        (("train", "--data", str(tmp_path / "missing.txt")), "missing.txt: no such file"),
        (("train", "--data", str(cluster.config), "--bogus", "1"), "No such option: --bogus"),
        (("evaluate", "--data", str(cluster.config)), "Missing option '--model-uri'"),
    ]:
        result = submit(*args)  # a usage error of the command it would run: exit 2, as that command's own
        assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stderr
        assert message in result.stderr and result.stdout == "", result.stdout + result.stderr

    remote = tmp_path / "remote.yaml"
    token = tmp_path / "token"
    token.write_text("not-the-token")
    remote.write_text(yaml.safe_dump({"ray": {"address": f"http://127.0.0.1:{free_port()}"}}))
    result = submit("train", "--data", str(cluster.config), config=remote)
    assert result.returncode == 1 and "cannot reach the Ray cluster" in result.stderr, result.stderr
    # the real cluster with a wrong token: refused before anything runs
    head = json.loads((cluster.root / "data" / "ray" / "head.json").read_text())
    remote.write_text(
        yaml.safe_dump({"ray": {"address": head["dashboard_url"], "auth_token_path": str(token)}})
    )
    result = submit("train", "--data", str(cluster.config), config=remote)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "invalid token" in result.stderr and str(token) in result.stderr, result.stderr

    # a job that fails on the cluster: status FAILED (stdout), the tail of its log (stderr), exit 1
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    job = _job_id(submit("train", "--data", str(empty)))
    status = _shopsight("jobs", "status", job, "--wait", "--timeout", "300", config=cluster.config)
    assert status.returncode == 1 and "FAILED" in status.stdout, status.stdout
    assert "last lines of its log" in status.stderr and "empty.txt" in status.stderr
    unknown = _shopsight("jobs", "status", "shopsight-train-nope", config=cluster.config)
    assert unknown.returncode == 1 and "no job 'shopsight-train-nope'" in unknown.stderr

    # a running job stopped: STOPPED, and `jobs status` exits 1 for it too
    long_run = tmp_path / "long.txt"
    long_run.write_text("".join(f"{u} {i}\n" for u in range(1, 200) for i in range(1, 30)))
    job = _job_id(submit("train", "--data", str(long_run), "--epochs", "500"))
    _wait_for(
        lambda: "RUNNING" in _shopsight("jobs", "status", job, config=cluster.config).stdout, 120, "RUNNING"
    )
    stop = _shopsight("jobs", "stop", job, config=cluster.config)
    assert stop.returncode == 0 and "stop requested (STOPPED)" in stop.stdout, stop.stdout
    status = _shopsight("jobs", "status", job, config=cluster.config)
    assert status.returncode == 1 and "STOPPED" in status.stdout
    again = _shopsight("jobs", "stop", job, config=cluster.config)
    assert again.returncode == 0 and "had already ended" in again.stdout

    # `serve` joins the same head (its token included) and leaves a head it did not start running
    status = _shopsight("serve", "status", config=cluster.config)
    assert status.returncode == 1 and "no serving application 'shopsight' is deployed" in status.stderr, (
        status.stdout + status.stderr
    )
    assert "InvalidAuthToken" not in status.stderr
    shutdown = _shopsight("serve", "shutdown", "--stop-ray", config=cluster.config)
    assert (
        shutdown.returncode == 0
        and "not started by `shopsight serve deploy`: left running" in shutdown.stdout
    )
    assert local_head(cluster.settings) is not None
