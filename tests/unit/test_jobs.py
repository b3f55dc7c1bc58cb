"""What `jobs submit` checks and ships before it contacts a cluster (the cluster itself: component tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shopsight.cli.jobs import check_arguments
from shopsight.platform import ShopsightError, load_settings
from shopsight.platform.jobs import KINDS, SETTINGS_FILE, job_settings, submit


def test_paths_become_absolute_and_other_options_pass_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "games.txt").write_text("1 1\n1 2\n1 3\n")
    args = check_arguments("train", ["--data", "games.txt", "--workers", "2", "--loss=softmax"], True)
    assert args == ["--data", str(tmp_path / "games.txt"), "--workers", "2", "--loss=softmax"]
    args = check_arguments("features", ["--events=games.txt", "--start", "2017-11-25", "--end", "2017-11-26",
                                        "--out", "out"], True)  # fmt: skip
    assert args[0] == f"--events={tmp_path / 'games.txt'}" and args[-1] == str(tmp_path / "out")
    (tmp_path / "ts.parquet").write_bytes(b"")  # the GAN trains as a job too
    args = check_arguments("train", ["--model", "gan", "--data", "ts.parquet", "--epochs", "30"], True)
    assert args == ["--model", "gan", "--data", str(tmp_path / "ts.parquet"), "--epochs", "30"]


@pytest.mark.parametrize(
    ("kind", "args", "local", "message"),
    [
        (
            "deploy",
            [],
            True,
            "unknown job kind 'deploy': one of features, materialize, train, tune, evaluate, promote",
        ),
        ("train", ["--data", "missing.txt"], True, "--data missing.txt: no such file or folder"),
        ("train", ["--data", "games.txt"], False, "a relative path means nothing on a remote cluster"),
        ("train", ["--data", "games.txt", "--workers", "0"], True, "--workers"),
        ("tune", ["--data", "games.txt", "--trials", "x"], True, "Invalid value for '--trials'"),
        ("evaluate", ["--data", "games.txt"], True, "--model-uri"),
        ("promote", [], True, "Missing argument"),
        ("promote", ["m", "--version", "3", "--force"], True, "--force needs --reason TEXT"),
        ("promote", ["m", "--force", "--reason", "  "], True, "--force needs --reason TEXT"),
        ("promote", ["m", "--eval-data", "missing.txt"], True, "--eval-data missing.txt: no such file"),
        ("promote", ["m", "--eval-data", "games.txt"], False, "a relative path means nothing"),
        ("promote", ["m", "--verison", "3"], True, "No such option: --verison"),
    ],
)
def test_bad_submissions_name_the_problem(tmp_path, monkeypatch, kind, args, local, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "games.txt").write_text("1 1\n")
    with pytest.raises(ShopsightError) as error:
        check_arguments(kind, args, local)
    assert message in str(error.value)


def test_a_remote_input_not_visible_here_is_passed_on(capsys):
    assert check_arguments("train", ["--data", "/cluster/only/games.txt"], False) == [
        "--data",
        "/cluster/only/games.txt",
    ]
    assert "not visible here" in capsys.readouterr().err  # a note, not the result


def test_every_kind_is_a_real_command():
    from shopsight.cli.jobs import _command

    for kind in KINDS:
        assert _command(kind).callback is not None, kind


def test_jobs_run_with_the_submitters_settings_minus_this_machines_connection(tmp_path):
    settings = load_settings(
        overrides={"data_dir": "rel", "ray.num_cpus": "2", "spark.master": "spark://m:7077"}, environ={}
    ).settings
    local = job_settings(settings, local_cluster=True)
    assert local["data_dir"] == str(Path("rel").absolute()) and local["spark"]["master"] == "spark://m:7077"
    assert local["ray"]["address"] is None and local["ray"]["num_cpus"] is None
    assert "data_dir" not in job_settings(settings, local_cluster=False)  # the cluster's own applies
    again = load_settings(overrides={}, environ={}, config_file=_yaml(tmp_path, local)).settings
    assert again.spark.master == "spark://m:7077" and again.data_dir == Path("rel").absolute()


def _yaml(folder: Path, values: dict) -> Path:
    import yaml

    path = folder / "shopsight-settings.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


class _Client:
    """What `submit` hands to Ray's JobSubmissionClient, kept instead of sent."""

    def __init__(self) -> None:
        self.submitted: list[dict] = []

    def submit_job(self, **job) -> str:
        self.submitted.append(job)
        return job["submission_id"]


class _Endpoint:
    address = "http://head:8265"

    def __init__(self) -> None:
        self.ray = _Client()

    def client(self) -> _Client:
        return self.ray


def test_a_promotion_runs_on_the_cluster_as_models_promote_with_its_options(tmp_path, monkeypatch):
    import shlex

    monkeypatch.chdir(tmp_path)
    (tmp_path / "frozen.txt").write_text("1 1\n")
    args = ["shopsight-next-item", "--version", "7", "--force", "--reason", "better on the frozen set",
            "--eval-data", "frozen.txt"]  # fmt: skip
    checked = check_arguments("promote", args, local_cluster=True)
    assert checked == [*args[:-1], str(tmp_path / "frozen.txt")]
    endpoint = _Endpoint()
    settings = load_settings(overrides={"data_dir": "d"}, environ={}).settings
    submission = submit(endpoint, "promote", checked, settings, local_cluster=True)  # type: ignore[arg-type]
    assert shlex.split(submission.entrypoint) == [
        "python", "-m", "shopsight", "--config", SETTINGS_FILE, "models", "promote", "shopsight-next-item",
        "--version", "7", "--force", "--reason", "better on the frozen set",
        "--eval-data", str(tmp_path / "frozen.txt"),
    ]  # fmt: skip
    (job,) = endpoint.ray.submitted
    assert job["entrypoint"] == submission.entrypoint and job["submission_id"] == submission.job_id
    assert submission.job_id.startswith("shopsight-promote-")
    assert job["metadata"] == {"shopsight_kind": "promote", "shopsight_profile": "local"}
    # on a remote cluster the frozen set is the cluster's: a path there is passed on as given
    remote = check_arguments("promote", ["shopsight-purchase", "--eval-data", "/data/eval/set"], False)
    assert remote == ["shopsight-purchase", "--eval-data", "/data/eval/set"]
