"""The `shopsight` command: help everywhere, one-line errors on stderr, documented exit codes, every
default and choice in the help, the same option names everywhere, summaries and -o json / yaml."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import typer
from typer.core import TyperOption
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


def test_bad_input_file_gives_one_line_error_on_stderr_and_nothing_on_stdout(tmp_path):
    (tmp_path / "events.json").write_text('{"user_id": 1}')
    result = _shopsight("data", "validate", "events.json", "--format", "taobao", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""  # `2>/dev/null` hides the whole failure
    (error,) = result.stderr.splitlines()
    assert error.startswith("error: ") and "events.json" in error and "JSON" in error


def test_a_missing_input_file_is_a_usage_error_on_stderr(tmp_path):
    result = _shopsight("data", "validate", "missing.csv", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert "missing.csv does not exist" in result.stderr and "Traceback" not in result.stderr


def test_bad_setting_gives_one_line_error(tmp_path):
    result = _shopsight("config", "show", cwd=tmp_path, env={"SHOPSIGHT_SPARK__MASTR": "x"})
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert result.stdout == "" and "unknown setting 'spark.mastr'" in result.stderr


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
    output = " ".join(result.stderr.replace("│", " ").split())
    assert result.returncode == 2 and "'gpt' is not one of 'sasrec', 'lstm', 'gan'" in output, output
    # the GAN learns feature rows, so interactions are not its data
    result = _shopsight("train", "--model", "gan", "--data", "pairs.txt", cwd=tmp_path)
    assert result.returncode == 1 and "pairs.txt: not a parquet training set" in result.stderr, result.stderr

    frame = purchase_frame(users=20, days=4)
    frame.iloc[:0].to_parquet(tmp_path / "empty.parquet")
    frame.drop(columns=["seq_behaviors"]).to_parquet(tmp_path / "partial.parquet")
    for name, message in (
        ("empty.parquet", "is empty"),
        ("partial.parquet", "missing column(s) seq_behaviors"),
    ):
        result = _shopsight("train", "--task", "purchase", "--data", name, cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and name in errors[0] and message in errors[0], result.stderr


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
    assert result.returncode == 1 and f"cannot load {missing}" in result.stderr, result.stdout + result.stderr
    settings = load_settings(overrides={"data_dir": str(tmp_path / "dd")}).settings
    server = local_server(settings)
    assert not server.running and server.pid is None


# ------------------------------------------------------------------------------------ conventions


def _normalised(text: str) -> str:
    """Help or an error box as one line: borders dropped, runs of blanks as one space."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _options(command):
    return [p for p in command.params if isinstance(p, TyperOption) and not p.hidden]


def _expected_default(option) -> str | None:
    """What `[default: ...]` shows for an option, None for a switch that is off unless given."""
    if isinstance(option.show_default, str):
        return f"({option.show_default})"
    if option.is_flag and not option.secondary_opts:
        return None  # --help, --version, --install-completion: actions, not settings
    if option.is_flag:
        return (option.opts if option.default else option.secondary_opts)[0].lstrip("-")
    if option.default is None:
        return None
    return str(option.default)


_COMMANDS = [(p, c) for p, c in _command_paths(typer.main.get_command(app)) if _options(c)]


@pytest.mark.parametrize("path,command", _COMMANDS, ids=[" ".join(p) or "shopsight" for p, _ in _COMMANDS])
def test_help_shows_every_default(path, command):
    """Every option with a default shows it: the value, or what decides it (`(serving.canary_share)`).
    A default written into the help text is eaten by rich markup, so none is."""
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for option in _options(command):
        written = re.search(r"[\[(]default\b|\bdefault:", option.help or "", re.IGNORECASE)
        assert not written, f"{option.opts}: the default goes in show_default, not in the help text"
        expected = _expected_default(option)
        if expected is None:
            continue
        name = next(opt for opt in option.opts if opt.startswith("--"))
        (line,) = [line for line in lines if re.match(rf"│\s+(\*\s+)?{re.escape(name)}\s", line)]
        assert f"[default: {expected}]" in line, f"{' '.join(path)} {name}: {line.strip()}"


@pytest.mark.parametrize(
    "path,args,option,choices",
    [
        ("train", ["--data", "."], "--model", "'sasrec', 'lstm', 'gan'"),
        ("train", ["--data", "."], "--loss", "'bce', 'sampled_softmax', 'softmax', 'gbce'"),
        ("train", ["--data", "."], "--task", "'auto', 'next_item', 'purchase', 'churn', 'synthetic_users'"),
        ("train", ["--data", "."], "--calibration", "'auto', 'isotonic', 'platt', 'identity'"),
        ("tune", ["--data", "."], "--model", "'lstm', 'sasrec'"),
        ("tune", ["--data", "."], "--task", "'auto', 'next_item', 'purchase', 'churn', 'synthetic_users'"),
        ("data validate", ["."], "--format", "'auto', 'taobao', 'sasrec', 'parquet'"),
        ("features build", ["--data", ".", "--start", "x", "--end", "y"], "--format", "'auto', 'taobao', "),
        ("models list", [], "--output", "'table', 'json', 'yaml'"),
    ],
)
def test_choices_are_listed_and_a_bad_one_is_a_usage_error(path, args, option, choices):
    help_text = _normalised(runner.invoke(app, [*path.split(), "--help"], env={"COLUMNS": "1000"}).output)
    assert "<" + choices.strip(", ").replace("'", "").replace(", ", "|") in help_text
    result = runner.invoke(app, [*path.split(), *args, option, "nope"])
    assert result.exit_code == 2
    message = _normalised(result.output)
    assert f"Invalid value for '{option}'" in message and f"'nope' is not one of {choices}" in message


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--data", "missing.txt"],
        ["tune", "--data", "missing.txt"],
        ["evaluate", "--model-uri", "models:/m@champion", "--data", "missing.txt"],
        ["features", "build", "--data", "missing.txt", "--start", "2017-11-25", "--end", "2017-11-26"],
        ["features", "push", "--data", "missing.txt"],
        ["data", "validate", "--data", "missing.txt"],
        ["models", "promote", "m", "--eval-data", "missing.txt"],
    ],
    ids=lambda args: " ".join(a for a in args if not a.startswith(("-", "m"))),
)
def test_a_missing_input_is_a_usage_error_in_every_command(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "missing.txt does not exist" in _normalised(result.output)


def test_inputs_are_data_switches_have_a_no_form_and_follow_is_f():
    """One spelling per role: the data a command reads is --data; a switch is --x/--no-x; following a log
    is -f/--follow."""
    commands = dict(_command_paths(typer.main.get_command(app)))
    for path in [("train",), ("tune",), ("evaluate",), ("features", "build"), ("features", "push"),
                 ("data", "validate")]:  # fmt: skip
        assert any("--data" in o.opts for o in _options(commands[path])), path
    # actions, and -v/--verbose, which every command line spells that way
    actions = {"--help", "--version", "--install-completion", "--show-completion", "--verbose"}
    for path, command in commands.items():
        for option in _options(command):
            assert not {"--events", "--input", "--file"} & set(option.opts), (path, option.opts)
            if option.is_flag and not actions & set(option.opts):
                assert option.secondary_opts, f"{' '.join(path)} {option.opts}: a switch is --x/--no-x"
            if "--follow" in option.opts:
                assert "-f" in option.opts, path


def test_former_option_names_still_work(tmp_path, monkeypatch):
    """`features build --events` (the name before --data) reads as --data, in either spelling, and help
    shows only --data; a positional file still works for `data validate`."""
    monkeypatch.chdir(tmp_path)
    for args in (["--events", "gone"], ["--events=gone"]):
        result = runner.invoke(
            app, ["features", "build", *args, "--start", "2017-11-25", "--end", "2017-11-26"]
        )
        assert result.exit_code == 2 and "Invalid value for '--data': gone does not exist" in _normalised(
            result.output
        )
    assert "--events" not in runner.invoke(app, ["features", "build", "--help"]).output
    both = runner.invoke(app, ["data", "validate", ".", "--data", "."])
    assert both.exit_code == 2 and "give the input once" in _normalised(both.output)


def test_shell_completion_is_offered():
    help_text = runner.invoke(app, ["--help"]).output
    assert "--install-completion" in help_text and "--show-completion" in help_text
    assert "Exit status: 0 done, 1 failed, 2 usage error" in _normalised(help_text)


def test_the_gate_refusal_has_its_own_exit_status():
    from shopsight.platform import PromotionRefused, ShopsightError

    assert issubclass(PromotionRefused, ShopsightError)
    assert (ShopsightError.exit_code, PromotionRefused.exit_code) == (1, 3)


# ---------------------------------------------------------------------------------- -o json | yaml


def test_status_commands_print_json_and_yaml_alone_on_stdout(tmp_path):
    """Nothing runs here: `mlflow status` and `cluster status` say so, with exit status 1 (a script's
    "down"); the JSON and YAML are the same data with the same keys."""
    import json
    import socket

    import yaml

    with socket.socket() as probe:  # a port nothing listens on: no note about a stranger on 5000
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    common = ("--data-dir", "dd", "--set", f"mlflow.port={port}")
    mlflow_json = _shopsight(*common, "mlflow", "status", "-o", "json", cwd=tmp_path)
    assert mlflow_json.returncode == 1, mlflow_json.stderr
    data = json.loads(mlflow_json.stdout)
    assert data == {
        "shared": False,
        "running": False,
        "tracking_uri": None,
        "backend_store": f"sqlite:///{tmp_path / 'dd' / 'mlflow' / 'mlflow.db'}",
        "artifact_root": str(tmp_path / "dd" / "mlflow" / "artifacts"),
        "auth": False,
        "pid": None,
        "log": str(tmp_path / "dd" / "mlflow" / "server.log"),
        "note": None,
        "user": None,
        "user_is_admin": None,
    }
    mlflow_yaml = _shopsight(*common, "mlflow", "status", "--output", "yaml", cwd=tmp_path)
    assert yaml.safe_load(mlflow_yaml.stdout) == data
    cluster = _shopsight("--data-dir", "dd", "cluster", "status", "-o", "json", cwd=tmp_path)
    assert cluster.returncode == 1 and cluster.stderr == ""
    assert json.loads(cluster.stdout) == {
        "address": None,
        "running": False,
        "dashboard_url": None,
        "gcs_address": None,
        "token_path": None,
        "nodes": [],
        "nodes_error": None,
    }
    table = _shopsight("--data-dir", "dd", "cluster", "status", cwd=tmp_path)
    assert table.returncode == 1 and "local Ray head: not running" in table.stdout


@pytest.mark.feast
def test_feature_catalog_as_json_and_yaml(tmp_path, monkeypatch):
    import json

    import yaml

    monkeypatch.chdir(tmp_path)
    root = ["--data-dir", str(tmp_path / "dd")]
    assert json.loads(runner.invoke(app, [*root, "features", "list", "-o", "json"]).stdout) == []
    assert runner.invoke(app, [*root, "features", "apply"]).exit_code == 0
    listed = runner.invoke(app, [*root, "features", "list", "-o", "json"])
    assert listed.exit_code == 0, listed.output
    records = {r["name"]: r for r in json.loads(listed.stdout)}
    assert records["user_activity"] == {
        "name": "user_activity",
        "kind": "feature view",
        "entities": ["user_id"],
        "fields": records["user_activity"]["fields"],
        "owner": "shopsight_features",
        "online": True,
        "fresh_until": None,  # not materialised yet
        "staleness_s": None,
    }
    assert records["user_activity"]["fields"] > 10
    assert records["user_profile_v1"]["kind"] == "feature service"
    described = runner.invoke(app, [*root, "features", "describe", "user_activity", "-o", "yaml"])
    data = yaml.safe_load(described.stdout)
    assert list(data) == [
        "name",
        "kind",
        "entities",
        "owner",
        "description",
        "online",
        "fresh_until",
        "fields",
    ]
    assert len(data["fields"]) == records["user_activity"]["fields"]
    assert set(data["fields"][0]) == {"name", "type", "owner", "description"}
    assert {"name": "n_pv_1d", "type": "Int64"}.items() <= data["fields"][0].items()


def test_plain_values_are_json_and_yaml_types():
    from datetime import UTC, datetime
    from pathlib import Path

    import numpy as np

    from shopsight.cli._output import plain, snake

    value = {
        "at": datetime(2017, 11, 25, 8, 30, tzinfo=UTC),
        "path": Path("/data/events"),
        "ids": (np.int64(3), 4),
        "scores": np.array([0.5, float("nan")]),
        "inf": float("inf"),
        1: {"nested": True},
    }
    assert plain(value) == {
        "at": "2017-11-25T08:30:00+00:00",
        "path": "/data/events",
        "ids": [3, 4],
        "scores": [0.5, None],
        "inf": None,
        "1": {"nested": True},
    }
    assert [snake(k) for k in ("hr@10", "NDCG@10", "gate.status", "latest version created")] == [
        "hr_at_10",
        "ndcg_at_10",
        "gate_status",
        "latest_version_created",
    ]


def _documented_commands():
    """Every `shopsight ...` line of the README's and docs' bash blocks, as its arguments."""
    import shlex
    from pathlib import Path

    root = Path(__file__).parents[2]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.split(r" #| \| | > ", line)[0].strip()  # comments, pipes, redirections
                found = re.match(r"^(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?shopsight\s+(.*)$", line)
                if found:
                    yield pytest.param(shlex.split(found.group(1)), id=f"{doc.name}: {line[:80]}")


@pytest.mark.parametrize("args", list(_documented_commands()))
def test_every_documented_command_parses(args):
    """The docs' commands use today's options and values: each parses (nothing runs; inputs need not
    exist here, as for `jobs submit`)."""
    from shopsight.cli._context import CliState

    command, name = typer.main.get_command(app), "shopsight"
    while True:
        try:
            ctx = command.make_context(name, list(args), obj=CliState(inputs_elsewhere=True))
        except typer.Exit:  # --help, --version
            return
        if not hasattr(command, "commands"):
            return
        # a group parses its own options and keeps the sub-command's arguments: its name comes before them
        name = args[len(args) - len(ctx.args) - 1]
        command, args = command.commands.get(name), ctx.args
        assert command is not None, f"no command {name}"
