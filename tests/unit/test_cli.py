"""The `shopsight` command: help everywhere, one-line errors, summaries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from shopsight.cli import app

runner = CliRunner()
GROUPS = ["data", "features", "train", "tune", "models", "serve", "jobs", "config"]


def _command_paths(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_every_group_is_there():
    root = typer.main.get_command(app)
    assert set(GROUPS) <= set(root.commands)


@pytest.mark.parametrize("path", [p for p, _ in _command_paths(typer.main.get_command(app))], ids=" ".join)
def test_help_at_every_level_explains_itself(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    command = dict(_command_paths(typer.main.get_command(app)))[path]
    assert (command.help or "").strip(), f"{' '.join(path) or 'shopsight'} has no help text"


def _shopsight(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "shopsight", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=120,
    )


def test_bad_input_file_gives_one_line_error_no_traceback(tmp_path):
    (tmp_path / "events.json").write_text('{"user_id": 1}')
    result = _shopsight("data", "validate", "events.json", "--format", "taobao", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    error_lines = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "events.json" in error_lines[0] and "JSON" in error_lines[0]


def test_bad_setting_gives_one_line_error(tmp_path):
    result = _shopsight("config", "show", cwd=tmp_path, env={"SHOPSIGHT_SPARK__MASTR": "x"})
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert "unknown setting 'spark.mastr'" in result.stdout


def test_config_show_lists_values_with_sources_and_masks_passwords(tmp_path):
    env = {"SHOPSIGHT_MLFLOW__BACKEND_STORE_URI": "postgresql://mlflow:s3cret@db:5432/mlflow"}
    result = _shopsight(
        "--profile", "cluster", "--set", "spark.master=local[2]", "config", "show", cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "s3cret" not in result.stdout and "postgresql://mlflow:***@db:5432/mlflow" in result.stdout
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") == 4}
    assert "local[2]" in lines["spark.master"] and "cli" in lines["spark.master"]
    assert "env:SHOPSIGHT_MLFLOW__BACKEND_STORE_URI" in lines["mlflow.backend_store_uri"]
    assert "profile:cluster" in lines["feast.online_store"]


def test_simulate_then_validate_with_summaries(tmp_path):
    sim = _shopsight(
        "--data-dir", "dd", "data", "simulate", "--users", "300", "--days", "3", "--seed", "5", cwd=tmp_path
    )
    assert sim.returncode == 0, sim.stdout + sim.stderr
    assert "Simulated" in sim.stdout and "events/s" in sim.stdout
    assert (tmp_path / "dd" / "simulated" / "events").is_dir()
    days = sorted(p.name for p in (tmp_path / "dd" / "simulated" / "events").iterdir())
    assert days == ["day=2017-11-25", "day=2017-11-26", "day=2017-11-27"]

    out = _shopsight("--data-dir", "dd", "data", "validate", "dd/simulated/events", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "good rows" in out.stdout and "Taobao (100M events)" in out.stdout
    # the window of the settings is Taobao's 9 days: simulated days outside it are quarantined, and
    # --strict turns rejects into a failing exit status
    late = _shopsight(
        "--data-dir",
        "dd",
        "data",
        "simulate",
        "--users",
        "50",
        "--days",
        "2",
        "--start",
        "2017-12-03",
        "--out",
        "late",
        cwd=tmp_path,
    )
    assert late.returncode == 0
    strict = _shopsight("--data-dir", "dd", "data", "validate", "late/events", "--strict", cwd=tmp_path)
    assert strict.returncode == 1 and "out_of_window" in strict.stdout
    assert list((tmp_path / "dd" / "quarantine").glob("events.*.rejected.csv"))


def test_usage_errors_are_reported_by_the_parser(tmp_path):
    result = _shopsight("data", "simulate", "--users", "0", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = _shopsight("data", "simulate", "--start", "yesterday", cwd=tmp_path)
    assert result.returncode == 2 and "is not a day" in result.stderr + result.stdout


def test_training_errors_name_the_problem(tmp_path):
    """Unknown model, an empty dataset, a training set missing columns: clear errors, no traceback."""
    from tests.conftest import purchase_frame

    (tmp_path / "pairs.txt").write_text("1 10\n1 11\n1 12\n")
    result = _shopsight("train", "--model", "gpt", "--data", "pairs.txt", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "unknown model 'gpt'" in output and "sasrec, lstm, gan" in output
    # the GAN learns feature rows, so interactions are not its data
    result = _shopsight("train", "--model", "gan", "--data", "pairs.txt", cwd=tmp_path)
    assert result.returncode == 1 and "pairs.txt: not a parquet training set" in result.stdout, result.stdout

    frame = purchase_frame(users=20, days=4)
    frame.iloc[:0].to_parquet(tmp_path / "empty.parquet")
    frame.drop(columns=["seq_behaviors"]).to_parquet(tmp_path / "partial.parquet")
    for name, message in (
        ("empty.parquet", "is empty"),
        ("partial.parquet", "missing column(s) seq_behaviors"),
    ):
        result = _shopsight("train", "--task", "purchase", "--data", name, cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
        errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and name in errors[0] and message in errors[0], result.stdout


def test_a_failing_command_leaves_no_server_running(tmp_path):
    """A bad argument fails before anything starts; a command that fails later stops the MLflow server
    it started (a succeeding one leaves it up for the next command)."""
    from tests.conftest import purchase_frame

    from shopsight.platform import load_settings
    from shopsight.platform.mlflow_server import local_server

    purchase_frame(users=20, days=4).to_parquet(tmp_path / "set.parquet")
    data_dir = ["--data-dir", str(tmp_path / "dd")]
    result = _shopsight(*data_dir, "evaluate", "--model-uri", "x", "--data", "set.parquet", cwd=tmp_path)
    assert result.returncode == 2 and "'x' is not a model" in result.stderr + result.stdout
    assert not (tmp_path / "dd" / "mlflow").exists()  # nothing started, nothing written

    missing = "models:/nope@champion"
    result = _shopsight(*data_dir, "evaluate", "--model-uri", missing, "--data", "set.parquet", cwd=tmp_path)
    assert result.returncode == 1 and f"cannot load {missing}" in result.stdout, result.stdout + result.stderr
    settings = load_settings(overrides={"data_dir": str(tmp_path / "dd")}).settings
    server = local_server(settings)
    assert not server.running and server.pid is None
