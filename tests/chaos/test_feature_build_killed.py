"""A feature build killed while Spark writes: the driver (SIGKILL of the command's process group) or Spark's
JVM alone, which in local mode holds the executors. No partial day partition is ever visible, the previous
output stays as it was, the next build removes what the killed one left and gives the same bytes as a
build that was never interrupted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.chaos._feature_builds import (
    DAYS,
    TABLES,
    build,
    build_command,
    hidden,
    published,
    simulate,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.spark, pytest.mark.slow]


@dataclass(frozen=True)
class World:
    root: Path
    events: Path
    other_events: Path  # another input: a build of it over the reference's files must not show
    reference: Path  # an uninterrupted build of ``events``
    files: dict[str, str]  # its published files' sha256


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("chaos-feature-build")
    events, other = simulate(root, seed=0), simulate(root, seed=1)
    reference = root / "reference"
    done = build(root, events, reference)
    assert done.returncode == 0, done.stdout + done.stderr
    files = published(reference)
    assert len(files) == DAYS * TABLES + 1  # one file per day and table, and the segment profile
    return World(root, events, other, reference, files)


def _writing(out: Path):
    """The staged tables, once Spark has started writing one (its output folder exists)."""
    return sorted(p.name for p in out.glob(".staging-*/*") if p.is_dir() and p.name != "_events")


def _jvm(pid: int) -> psutil.Process:
    """The Spark JVM that the command ``pid`` started."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.name() == "java":
                found.append(child)
        except psutil.NoSuchProcess:  # a short-lived helper (bash, rm) that has exited
            pass
    (jvm,) = found
    return jvm


def _group_gone(pgid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_a_build_killed_mid_write_shows_no_partial_day_and_reruns_to_the_same_bytes(world, tmp_path, record):
    out = tmp_path / "features"
    command = build_command(world.root, world.events, out)
    killed = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )  # its own process group: the JVM and Spark's Python workers die with it
    writing = wait_for(lambda: _writing(out), 300, "Spark writing a table", killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert _group_gone(killed.pid), "a process of the killed build survived it"

    # Nothing half-written is visible: a file there is one of the uninterrupted build's, byte for byte.
    visible = published(out)
    partial = sorted(name for name, digest in visible.items() if world.files.get(name) != digest)
    assert partial == [], f"killed while writing {writing}: partial files {partial}"
    leftovers = hidden(out)
    assert any(name.startswith(".staging-") for name in leftovers), leftovers  # the kill left its staging

    started = time.monotonic()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert hidden(out) == []  # the killed build's staging folder is gone
    rebuilt = published(out)
    same = [name for name, digest in world.files.items() if rebuilt.get(name) == digest]
    assert rebuilt == world.files  # byte-identical to the build that was never interrupted
    record(
        in_flight=f"1 build ({len(world.files)} files; Spark writing {', '.join(writing)})",
        lost=len(partial) + len(world.files) - len(same),
        recovered=len(same),
        seconds_to_recover=round(seconds, 1),
    )


def test_sparks_jvm_killed_mid_build_fails_in_one_line_and_keeps_the_previous_output(world, tmp_path, record):
    """Spark's JVM, killed alone: the command (still alive) says so in one line, removes its staging and
    leaves the previous output (the reference's) as it was, though it was building another input."""
    out = tmp_path / "features"
    shutil.copytree(world.reference, out)
    building = subprocess.Popen(
        build_command(world.root, world.other_events, out),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        writing = wait_for(lambda: _writing(out), 300, "Spark writing a table", building)
        jvm = _jvm(building.pid)
        started = time.monotonic()
        jvm.send_signal(signal.SIGKILL)
        stdout, stderr = building.communicate(timeout=120)
        seconds = time.monotonic() - started
    finally:
        if building.poll() is None:
            os.killpg(building.pid, signal.SIGKILL)
            building.wait()
    console = stdout + stderr
    assert building.returncode == 1, console
    assert "Traceback" not in console and "\tat " not in console, console
    (error,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert error == (
        "error: Spark's JVM exited (killed by SIGKILL) while building features; nothing was published: "
        f"the previous output under {out} is unchanged"
    ), stderr
    assert hidden(out) == []  # its staging folder is removed by the command itself
    after = published(out)
    assert after == world.files
    record(
        in_flight=f"1 build over a previous one ({len(after)} files; Spark writing {', '.join(writing)})",
        lost=sum(after.get(name) != digest for name, digest in world.files.items()),
        recovered=len(after),
        seconds_to_recover=round(seconds, 1),  # from the kill to the command's one-line error
    )
