"""The console keeps what a user acts on; what the engines say goes to <data_dir>/logs/shopsight.log."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, sys, subprocess, warnings, logging
from pathlib import Path
from shopsight.platform import console, err_console
from shopsight.platform._logs import capture_engine_output, engine_output_shown, quiet_console

quiet_console()
assert engine_output_shown()
log = capture_engine_output(Path(sys.argv[1]))
assert not engine_output_shown()
os.write(2, b"native noise on fd 2\\n")          # a JVM or a C library
os.write(1, b"native noise on fd 1\\n")
print("a library's print")                       # Feast's materialise, MLflow's run URL
warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
logging.getLogger("ray").warning("a library's log record")
subprocess.run(["sh", "-c", "echo a child process says"], check=True)
console.print("the result")
err_console.print("a progress line")
"""


def test_engines_talk_to_the_log_and_the_consoles_to_the_terminal(tmp_path):
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "the result\n"
    assert done.stderr == "a progress line\n"
    log = (tmp_path / "logs" / "shopsight.log").read_text()
    for said in (
        "native noise on fd 2",
        "native noise on fd 1",
        "a library's print",
        "DeprecationWarning: a library's deprecation",
        "WARNING ray: a library's log record",
        "a child process says",
    ):
        assert said in log, (said, log)


def test_a_usage_error_after_the_capture_still_reaches_the_terminal(tmp_path):
    """`--data` given twice is found inside the command, after the settings (and the capture): click's
    message must still be on the terminal, with exit status 2."""
    data = tmp_path / "events.csv"
    data.write_text("1,2,3,pv,1511658000\n")
    done = subprocess.run(
        [sys.executable, "-m", "shopsight", "--data-dir", str(tmp_path / "dd"), "data", "validate",
         str(data), "--data", str(data)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "give the input once" in done.stderr and done.stdout == ""
    assert (tmp_path / "dd" / "logs" / "shopsight.log").exists()


def test_verbose_leaves_the_streams_alone(tmp_path):
    script = SCRIPT.replace("quiet_console()", "quiet_console(); show_engine_output()").replace(
        "import capture_engine_output,", "import capture_engine_output, show_engine_output,"
    )
    script = script.replace("assert not engine_output_shown()", "assert engine_output_shown()")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "native noise on fd 2" in done.stderr and "a library's print" in done.stdout
    assert "a library's log record" in done.stderr
    assert not (tmp_path / "logs").exists()
