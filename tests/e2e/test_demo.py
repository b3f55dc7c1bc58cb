"""The README's demo command, as a user runs it (on a smaller world to stay quick)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shopsight.data.schema import TAOBAO_BEHAVIOR_MIX


@pytest.mark.slow
def test_demo_simulates_validates_and_summarises(tmp_path):
    shopsight = shutil.which("shopsight", path=str(Path(sys.executable).parent)) or "shopsight"
    result = subprocess.run(
        [shopsight, "--data-dir", str(tmp_path / "dd"), "demo", "--users", "500"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1. data: simulate" in out and "2. data: validate" in out and "Demo finished" in out
    rows = {
        line.split("│")[1].strip(): line.split("│")[2:4] for line in out.splitlines() if line.count("│") == 4
    }
    for behavior, real in TAOBAO_BEHAVIOR_MIX.items():
        simulated, taobao = (float(cell) for cell in rows[behavior])
        assert taobao == real and abs(simulated - real) < 1.0
    summary = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in out.splitlines()
        if line.count("│") == 3
    }
    assert summary["rejected rows"] == "0"
    assert (
        summary["good rows"] == summary["rows read"] and int(summary["good rows"].replace(",", "")) > 20_000
    )
    events = tmp_path / "dd" / "demo" / "simulated" / "events"
    assert len(list(events.glob("day=*"))) == 9
