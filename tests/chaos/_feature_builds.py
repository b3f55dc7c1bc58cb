"""Feature builds for the chaos cases: `shopsight features build` as its own process, on tiny simulated
events (100 users, 5 days; 3 snapshot days, so 18 day partitions and the segment profile)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

START, END = "2017-11-27", "2017-11-29"
DAYS = 3
TABLES = 6


def cli(data_dir: Path) -> list[str]:
    """The command line up to the command: loopback Spark on 2 cores, few shuffle partitions."""
    return [
        *(sys.executable, "-m", "shopsight", "--data-dir", str(data_dir)),
        *("--set", "spark.master=local[2]", "--set", "spark.shuffle_partitions=2"),
    ]


def simulate(data_dir: Path, seed: int) -> Path:
    """Simulated events (day-partitioned parquet) of ``seed``; returns their folder."""
    out = data_dir / f"simulated-{seed}"
    command = [*cli(data_dir), "data", "simulate", "--users", "100", "--days", "5", "--seed", str(seed)]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out / "events"


def build_command(data_dir: Path, events: Path, out: Path) -> list[str]:
    return [*cli(data_dir), "features", "build", "--data", str(events), "--start", START, "--end", END,
            "--out", str(out)]  # fmt: skip


def build(data_dir: Path, events: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(build_command(data_dir, events, out), capture_output=True, text=True, timeout=600)


def published(out: Path) -> dict[str, str]:
    """sha256 of every published parquet file under ``out``: what readers see (no hidden folder)."""
    return {
        str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(out.rglob("*.parquet"))
        if not any(part.startswith(".") for part in path.relative_to(out).parts)
    }


def hidden(out: Path) -> list[str]:
    """What builds leave beside the output: staging folders, partitions moved aside, partial files."""
    return sorted(
        str(path.relative_to(out))
        for path in out.rglob("*")
        if path.name.startswith(".") or path.name.endswith(".partial")
    )


def wait_for(condition: Callable[[], object], timeout: float, what: str, process: subprocess.Popen):
    """Poll ``condition`` until it is truthy (returned); fails if ``process`` ends or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert process.poll() is None, f"the build ended (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)
