"""Cluster job benchmarks on this machine, side by side in one run:

1. Submission overhead: from `shopsight jobs submit train` to the first training step (the moment the
   rank-0 worker logs that it starts), against the same command run directly (`shopsight train`), both
   on the local head of `shopsight cluster up`.
2. Throughput of a 2-worker Ray Train run on two nodes (head + one joined node, one CPU and one `trainer`
   each: one worker per node) beside the same run on one node (two CPUs, two `trainer`s).

Both nodes live on this machine, so (2) measures what going through two raylets costs, not more hardware.

    python -m benchmarks.bench_cluster [--data games.txt] [--lines 100000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml

from benchmarks._machine import append_report, describe_machine

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sasrec" / "games.txt"
STARTING = re.compile(r"worker rank 0 of \d+ on node \w+, starting (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})")
EPOCH = re.compile(r"epoch +(\d+)  loss .*?([\d,]+) samples/s")


def _shopsight(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shopsight", "--config", str(config), *args],
        capture_output=True, text=True, timeout=3600, env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip


def _settings_file(root: Path, num_cpus: int, trainers: int) -> Path:
    path = root / f"settings-{num_cpus}cpu.yaml"
    ray = {"num_cpus": num_cpus, "head_resources": {"trainer": trainers}, "worker_resources": {"trainer": 1},
           "storage_path": str(root / "shared"), "head_port": 46379, "dashboard_port": 48265}  # fmt: skip
    path.write_text(yaml.safe_dump({"data_dir": str(root / "data"), "ray": ray}))
    return path


def _first_step(log: str) -> float:
    match = STARTING.search(log)
    if not match:
        raise RuntimeError(f"no 'worker rank 0 ... starting' line in the log:\n{log[-2000:]}")
    return datetime.fromisoformat(match.group(1)).timestamp()


def _steady_samples_per_second(log: str) -> float:
    # one value per epoch (a line printed twice, as Ray Train V2 did before its print patch was turned off, counts once)
    per_epoch = {int(e): float(s.replace(",", "")) for e, s in EPOCH.findall(log)}
    values = [per_epoch[e] for e in sorted(per_epoch)][1:] or list(per_epoch.values())
    return float(np.mean(values))


def _job(config: Path, *args: str) -> tuple[str, float]:
    """Submit, wait; returns (log, submit time)."""
    submitted = time.time()
    out = _shopsight(config, "jobs", "submit", "train", *args).stdout
    job = re.search(r"shopsight-train-\d{8}-\d{6}-[0-9a-f]{6}", out)
    if not job:
        raise RuntimeError(out)
    status = _shopsight(config, "jobs", "status", job.group(0), "--wait")
    log = _shopsight(config, "jobs", "logs", job.group(0)).stdout
    if status.returncode != 0:
        raise RuntimeError(status.stdout + log[-3000:])
    return log, submitted


def main() -> None:
    from shopsight.platform import load_settings
    from shopsight.platform.mlflow_server import stop_local_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--lines", type=int, default=100_000, help="first lines of the data file")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="submissions timed per way")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shopsight-bench-cluster-"))
    data = root / "data.txt"
    with open(args.data) as source:
        data.write_text("".join(line for _, line in zip(range(args.lines), source, strict=False)))
    train = ["--data", str(data), "--epochs", str(args.epochs), "--eval-every", str(args.epochs)]
    result: dict = {"machine": describe_machine(), "data": f"{args.data.name}, first {args.lines:,} lines"}

    # 1. submission overhead, and 2b. one node with two CPUs
    one_node = _settings_file(root, num_cpus=2, trainers=2)
    settings = load_settings(config_file=one_node, environ={}).settings
    try:
        _measure(result, root, one_node, train, args.repeats)
    finally:
        stop_local_server(settings)
    _report(result, args)


def _measure(result: dict, root: Path, one_node: Path, train: list[str], repeats: int) -> None:
    from shopsight.platform import load_settings
    from shopsight.platform.ray_cluster import local_head, start_worker_node, stop_worker_node

    assert _shopsight(one_node, "cluster", "up").returncode == 0
    try:
        _shopsight(one_node, "mlflow", "up")  # both ways find the tracking server running
        submit, direct = [], []
        for i in range(repeats):
            log, submitted = _job(one_node, *train, "--name", f"submit-{i}")
            submit.append(_first_step(log) - submitted)
            started = time.time()
            run = _shopsight(one_node, "train", *train, "--name", f"direct-{i}")
            if run.returncode != 0:
                raise RuntimeError(run.stdout + run.stderr)
            direct.append(_first_step(run.stdout + run.stderr) - started)
            print(f"submit -> first step {submit[-1]:.1f} s; direct {direct[-1]:.1f} s", flush=True)
        result["submission"] = {"jobs_submit_s": submit, "direct_s": direct}
        log, _ = _job(one_node, *train, "--workers", "2", "--name", "one-node")
        result["one_node_2_workers"] = _steady_samples_per_second(log)
    finally:
        _shopsight(one_node, "cluster", "down")

    # 2a. two nodes, one CPU each
    two_nodes = _settings_file(root, num_cpus=1, trainers=1)
    assert _shopsight(two_nodes, "cluster", "up").returncode == 0
    head = local_head(load_settings(config_file=two_nodes, environ={}).settings)
    node = start_worker_node(head, num_cpus=1, resources={"trainer": 1})
    try:
        log, _ = _job(two_nodes, *train, "--workers", "2", "--name", "two-nodes")
        placed = set(re.findall(r"worker rank \d of 2 on node (\w+)", log))
        assert len(placed) == 2, f"workers were not spread over the two nodes: {placed}"
        result["two_nodes_2_workers"] = _steady_samples_per_second(log)
    finally:
        stop_worker_node(node)
        _shopsight(two_nodes, "cluster", "down")


def _report(result: dict, args) -> None:
    ratio = result["two_nodes_2_workers"] / result["one_node_2_workers"]
    sub, direct = (
        np.median(result["submission"]["jobs_submit_s"]),
        np.median(result["submission"]["direct_s"]),
    )
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    (RESULTS / f"cluster-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    machine = result["machine"]
    append_report(
        RESULTS / "cluster.md",
        "Cluster jobs: submission overhead and two-node throughput",
        "python -m benchmarks.bench_cluster " + " ".join(sys.argv[1:]),
        [
            f"## {machine['date']}: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}",
            "",
            f"Data: {result['data']}; SASRec, {args.epochs} epochs, batch 128, 1 thread per worker.",
            "",
            "| measure | value |",
            "| --- | ---: |",
            f"| `jobs submit` -> first training step, median of {args.repeats} (s) | {sub:.1f} |",
            f"| `shopsight train` (same head) -> first training step, median (s) | {direct:.1f} |",
            f"| submission overhead (s) | {sub - direct:+.1f} |",
            f"| 2 workers on 1 node (2 CPUs), samples/s | {result['one_node_2_workers']:,.0f} |",
            f"| 2 workers on 2 nodes (1 CPU each), samples/s | {result['two_nodes_2_workers']:,.0f} |",
            f"| 2 nodes / 1 node | {ratio:.2f} |",
        ],
    )


if __name__ == "__main__":
    main()
