"""Training through the CLI: Ray Train, a real MLflow server, registration, a registry round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, free_port):
    from shopsight.platform import load_settings
    from shopsight.platform.mlflow_server import stop_local_server

    folder = tmp_path_factory.mktemp("train")
    data = folder / "pattern.txt"
    rng = np.random.default_rng(0)
    with data.open("w") as f:
        for user in range(1, 301):
            start = rng.integers(0, 40)
            f.writelines(f"{user} {100 + (start + t) % 40}\n" for t in range(12))
    port = free_port()
    common = [
        sys.executable,
        "-m",
        "shopsight",
        "--data-dir",
        str(folder / "dd"),
        "--set",
        f"mlflow.port={port}",
    ]
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [*common, "--set", "ray.num_cpus=2", "train", "--model", "sasrec", "--data", str(data),
         "--epochs", "6", "--batch-size", "32", "--lr", "0.005", "--max-len", "10", "--eval-every", "2",
         "--name", "pattern"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    settings = load_settings(
        overrides={"data_dir": str(folder / "dd"), "mlflow.port": str(port)}, environ={}
    ).settings
    yield result, settings, data, common, env
    stop_local_server(settings)


def test_train_registers_a_challenger_with_its_run(trained):
    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import tracking_uri

    result, settings, data, _, _ = trained
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Trained" in result.stdout and "challenger" in result.stdout
    client = MlflowClient(tracking_uri(settings, start=False))
    version = client.get_model_version_by_alias("shopsight-next-item", "challenger")
    run = client.get_run(version.run_id)
    assert run.data.params["model"] == "sasrec" and run.data.params["loop.epochs"] == "6"
    assert run.data.tags["dataset.sha256"] == __import__("hashlib").sha256(data.read_bytes()).hexdigest()
    assert run.data.metrics["test_hr_at_10"] > 0.9 > run.data.metrics["popularity_hr_at_10"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/learning_curves.png",
        "evaluation/hr_by_sequence_length.png",
        "evaluation/evaluation.md",
    } <= artifacts


def test_the_run_names_its_training_data_as_an_mlflow_dataset(trained):
    """The UI shows which data trained which run: the file as a dataset input of the run (its path, the
    first 12 hex digits of its sha256 as the digest), beside the run's dataset.* tags."""
    import hashlib

    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import tracking_uri

    _, settings, data, _, _ = trained
    client = MlflowClient(tracking_uri(settings, start=False))
    run = client.get_run(client.get_model_version_by_alias("shopsight-next-item", "challenger").run_id)
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    (used,) = run.inputs.dataset_inputs
    assert (used.dataset.name, used.dataset.digest) == ("pattern.txt", sha[:12])
    assert used.dataset.source_type == "local"
    assert json.loads(used.dataset.source) == {"uri": str(data.absolute())}
    tags = {tag.key: tag.value for tag in used.tags}
    assert tags["mlflow.data.context"] == "training" and tags["sha256"] == sha
    assert run.data.tags["dataset.sha256"] == sha and run.data.tags["dataset.path"] == str(data.absolute())


def test_registered_model_predicts_any_batch_and_length(trained):
    import mlflow

    from shopsight.platform.mlflow_server import tracking_uri

    _, settings, _, _, _ = trained
    mlflow.set_tracking_uri(tracking_uri(settings, start=False))
    model = mlflow.pyfunc.load_model("models:/shopsight-next-item@challenger")
    batch = pd.DataFrame(
        {
            "item_ids": [
                [100, 101, 102],
                [120],
                [105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116],
                [],
            ]
        }
    )
    out = model.predict(batch, params={"k": 5})
    assert len(out) == 4 and all(len(items) == 5 for items in out["items"])
    assert out["items"][0][0] == 103 and out["items"][2][0] == 117  # it learnt the walk
    assert 102 not in out["items"][0]  # what was just seen is not recommended
    single = model.predict(batch.iloc[[2]], params={"k": 5})
    assert single["items"][0] == out["items"][2] and np.allclose(
        single["scores"][0], out["scores"][2], atol=1e-5
    )


def test_evaluate_reproduces_the_test_metrics_and_bad_inputs_fail_clearly(trained, tmp_path):
    result, settings, data, common, env = trained
    evaluated = subprocess.run(
        [*common, "evaluate", "--model-uri", "models:/shopsight-next-item@challenger", "--data", str(data)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    line = next(row for row in evaluated.stdout.splitlines() if "models:/" in row)
    assert "300" in line
    unknown = subprocess.run(
        [*common, "train", "--model", "gpt", "--data", str(data)], capture_output=True, text=True, env=env
    )
    assert unknown.returncode == 2 and "'gpt' is not one of" in unknown.stderr and unknown.stdout == ""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    failed = subprocess.run([*common, "train", "--data", str(empty)], capture_output=True, text=True, env=env)
    assert (
        failed.returncode == 1
        and "empty" in failed.stderr
        and "Traceback" not in failed.stdout + failed.stderr
    )


def test_distil_a_registered_model_into_a_new_averaged_one(trained, tmp_path):
    """Runs last: it moves the challenger alias to the student."""
    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import tracking_uri

    _, settings, data, common, env = trained
    teacher = "models:/shopsight-next-item/1"
    student = subprocess.run(
        [*common, "--set", "ray.num_cpus=2", "train", "--model", "sasrec", "--data", str(data),
         "--loss", "sampled_softmax", "--teacher", teacher, "--distill-weight", "0.7", "--seed", "3",
         "--swa-start", "2",
         "--epochs", "4", "--batch-size", "32", "--lr", "0.005", "--max-len", "10", "--eval-every", "2",
         "--name", "student"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert student.returncode == 0, student.stdout[-3000:] + student.stderr[-3000:]
    assert "distilling from 1 teacher(s)" in student.stdout + student.stderr
    client = MlflowClient(tracking_uri(settings, start=False))
    version = client.get_model_version_by_alias("shopsight-next-item", "challenger")
    assert version.version == "2"
    run = client.get_run(version.run_id)
    assert run.data.params["teachers"] == teacher
    assert run.data.params["loop.distill_weight"] == "0.7" and run.data.params["loop.seed"] == "3"
    assert run.data.params["loop.swa_start"] == "2"
    assert run.data.metrics["test_hr_at_10"] > 0.9  # the walk, learnt from the teacher and the data

    other = tmp_path / "other.txt"  # 20 items instead of 40: not the teacher's catalogue
    other.write_text("".join(f"{u} {100 + (u + t) % 20}\n" for u in range(1, 51) for t in range(6)))
    refused = [
        (["--data", str(other), "--loss", "sampled_softmax", "--teacher", teacher], "another item catalogue"),
        (
            ["--data", str(data), "--loss", "bce", "--teacher", teacher],
            "needs --loss sampled_softmax or softmax",
        ),
        (["--data", str(data), "--loss", "softmax", "--teacher", "models:/shopsight-next-item/9"], "cannot"),
    ]
    for args, message in refused:
        failed = subprocess.run(
            [*common, "train", *args], capture_output=True, text=True, env=env, timeout=300
        )
        out = failed.stdout + failed.stderr
        assert failed.returncode == 1 and message in out and "Traceback" not in out, out[-2000:]
