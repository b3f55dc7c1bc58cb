"""A promotion killed mid-way (kill -9 of the command, or its MLflow server killed under it): the alias and
the history stay consistent, and the next promotion is not blocked until the lock expires."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.component.test_promotion import NAME, Registry

pytestmark = [pytest.mark.chaos, pytest.mark.mlflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, free_port):
    from shopsight.platform.mlflow_server import stop_local_server

    reg = Registry(tmp_path_factory.mktemp("chaos-promotion"), free_port())
    try:  # a setup that fails stops its server too
        reg.start()
        first = reg.register(trained=True)
        assert reg.run("models", "promote", NAME, "--version", first).returncode == 0
        yield reg
    finally:
        stop_local_server(reg.settings)


def _lock(registry) -> dict | None:
    from shopsight.lifecycle.registry import LOCK_TAG

    text = (registry.client.get_registered_model(NAME).tags or {}).get(LOCK_TAG)
    return json.loads(text) if text else None


def _holding_the_lock(registry, version: str, settle_s: int = 60, **output) -> subprocess.Popen:
    """`models promote` in its own process, once it holds the lock (its settle wait made ``settle_s``
    long)."""
    command = [*registry.cli, "--set", f"promotion.lock_settle_s={settle_s}", "models", "promote", NAME]
    output = output or {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    holding = subprocess.Popen([*command, "--version", version], env=registry.env, **output)
    deadline = time.time() + 120
    while (_lock(registry) or {}).get("pid") != holding.pid:
        assert holding.poll() is None and time.time() < deadline, "the promotion never took the lock"
        time.sleep(0.2)
    return holding


def _promote_and_kill_holding_the_lock(registry, version: str) -> dict:
    """A promotion killed with SIGKILL while it holds the lock; returns the lease it left behind."""
    holding = _holding_the_lock(registry, version)
    holding.send_signal(signal.SIGKILL)
    holding.wait(timeout=30)
    return _lock(registry)


def test_a_killed_promotion_does_not_block_the_next_one(registry, record):
    champion, entries = registry.champion(), len(registry.history())
    candidate = registry.register(trained=True)
    left = _promote_and_kill_holding_the_lock(registry, candidate)
    assert left is not None and left["expires"] > time.time() + 600  # without a takeover: blocked an hour
    assert registry.champion() == champion and len(registry.history()) == entries  # nothing half-done

    started = time.time()
    result = registry.run_process("models", "promote", NAME, "--version", candidate)
    recovered_in = time.time() - started
    assert result.returncode == 0, result.stdout + result.stderr
    # what the command says along the way is on stderr, its result on stdout
    assert "took over the lock" in result.stderr and f"pid {left['pid']}" in result.stderr
    assert registry.champion() == candidate and _lock(registry) is None
    entry = registry.history()[-1]
    assert (entry["action"], entry["from"], entry["to"]) == ("promote", champion, candidate)
    # the history and the alias agree: a rollback walks back to the champion before
    assert registry.run("models", "rollback", NAME, "--reason", "chaos").returncode == 0
    assert registry.champion() == champion
    record(in_flight="1 promotion", lost=0, recovered=1, seconds_to_recover=round(recovered_in, 1))


def test_a_live_holder_on_this_machine_still_blocks(registry):
    """The takeover is only for a holder that is gone: a running promotion keeps its lock."""
    candidate = registry.register(trained=True)
    holding = _holding_the_lock(registry, candidate)
    try:
        result = registry.run_process("models", "promote", NAME, "--version", candidate)
        assert result.returncode == 1 and "is in progress" in result.stderr, result.stdout + result.stderr
    finally:
        holding.kill()
        holding.wait(timeout=30)


def test_a_promotion_killed_after_its_record_before_the_alias_is_finished_by_the_next_one(registry, record):
    """The registry as a promotion killed after writing its history entry (the decision) and before
    moving the alias leaves it: the next command that takes the lock finishes the move, so the history
    and the alias agree again, and a rollback works from there."""
    from shopsight.lifecycle.registry import LOCK_TAG, Lease, append_history

    champion = registry.champion()
    candidate = registry.register(trained=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid whose process has exited
    lease = Lease(
        token="f" * 32, action="promotion", owner=f"chaos@{socket.gethostname()} pid {gone.pid}",
        since="2026-11-30T00:00:00Z", expires=time.time() + 3600, detail=f"version {candidate}",
        host=socket.gethostname(), pid=gone.pid, pid_started=time.time() - 60,
    )  # fmt: skip
    registry.client.set_registered_model_tag(NAME, LOCK_TAG, json.dumps(lease.__dict__))
    append_history(
        registry.client, NAME,
        {"action": "promote", "at": "2026-11-30T00:00:00Z", "by": "chaos", "from": champion, "to": candidate,
         "gate": "passed", "forced": False, "reason": "killed before the alias moved", "lock": lease.token},
    )  # fmt: skip
    assert registry.champion() == champion  # history says candidate, the alias does not (yet)

    started = time.time()
    result = registry.run_process("models", "rollback", NAME, "--reason", "after the kill")
    recovered_in = time.time() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "took over the lock" in result.stderr
    assert f"finished its promote: champion is version {candidate}" in result.stderr
    entry = registry.history()[-1]
    assert (entry["action"], entry["from"], entry["to"]) == ("rollback", candidate, champion)
    assert registry.champion() == champion and _lock(registry) is None
    record(in_flight="1 promotion, recorded, alias not moved", lost=0, recovered=1,
           seconds_to_recover=round(recovered_in, 1))  # fmt: skip


def test_the_mlflow_server_killed_during_a_promotion_leaves_the_alias_and_history_consistent(
    registry, record
):
    """The server dies (SIGKILL of its process group) while a promotion holds the lock, and comes back on
    its address and store: the promotion's calls are retried (MLflow's client backs off and tries again)
    and it finishes, the alias and the history agreeing, and no lock left behind."""
    from shopsight.platform.mlflow_server import tracking_uri

    champion, entries = registry.champion(), len(registry.history())
    candidate = registry.register(trained=True)
    holding = _holding_the_lock(
        registry, candidate, settle_s=8, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    record_file = registry.settings.data_dir / "mlflow" / "server.json"
    os.killpg(json.loads(record_file.read_text())["pid"], signal.SIGKILL)
    killed = time.time()
    time.sleep(2)
    assert tracking_uri(registry.settings) == registry.uri  # back on the same address
    restarted = time.time()
    out, err = holding.communicate(timeout=300)
    assert holding.returncode == 0, out.decode() + err.decode()
    assert "Traceback" not in err.decode()
    assert registry.champion() == candidate and _lock(registry) is None
    history = registry.history()
    assert len(history) == entries + 1
    assert (history[-1]["action"], history[-1]["from"], history[-1]["to"]) == ("promote", champion, candidate)
    record(
        in_flight="1 promotion holding the lock, server down " + f"{restarted - killed:.0f} s",
        lost=0,
        recovered=1,
        seconds_to_recover=round(time.time() - killed, 1),
    )
