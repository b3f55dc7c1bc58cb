"""`shopsight train --model gan` through the CLI: Ray Train, a real MLflow server, the synthetic-data
report, registration, and a registry round trip that generates users on demand."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from tests.conftest import purchase_frame

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]

GENERATED = ["n_pv_1d", "n_cart_1d", "cvr_buy_pv_1d", "hours_since_buy", "seq_length", "segment_id"]


@pytest.fixture(scope="module")
def trained_gan(tmp_path_factory, free_port):
    from shopsight.platform import load_settings
    from shopsight.platform.mlflow_server import stop_local_server

    folder = tmp_path_factory.mktemp("gan")
    data = folder / "training_set.parquet"
    purchase_frame(users=300, days=4).to_parquet(data, coerce_timestamps="us")
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
    settings = load_settings(
        overrides={"data_dir": str(folder / "dd"), "mlflow.port": str(port)}, environ={}
    ).settings
    try:  # the MLflow server the CLI starts is stopped even when the run fails or times out
        result = subprocess.run(
            [*common, "--set", "ray.num_cpus=2", "train", "--model", "gan", "--data", str(data),
             "--epochs", "5", "--batch-size", "100", "--name", "synthetic"],
            capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        yield result, settings, data, common, env
    finally:
        stop_local_server(settings)


def test_gan_training_registers_a_challenger_with_its_report(trained_gan):
    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import tracking_uri

    result, settings, data, _, _ = trained_gan
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "TSTR / TRTR" in result.stdout and "shopsight-synthetic-users version 1" in result.stdout
    for epoch in range(1, 6):  # one progress line per epoch, printed once
        assert output.count(f"epoch {epoch:>3}  critic ") == 1, output[-3000:]
    # the workers' lines come through the driver, without Ray's prefixes; Ray's own lines go to the log
    assert "RayTrainWorker pid=" not in output and "TrainController" not in output, output[-3000:]
    assert all(f"epoch {epoch:>3}  critic " in result.stderr for epoch in range(1, 6))  # progress: stderr
    log = (settings.data_dir / "logs" / "shopsight.log").read_text()
    assert "Started a local Ray instance" in log and "DeprecationWarning" not in output
    client = MlflowClient(tracking_uri(settings, start=False))
    version = client.get_model_version_by_alias("shopsight-synthetic-users", "challenger")
    run = client.get_run(version.run_id)
    assert run.data.params["model"] == "gan" and run.data.params["model.epochs"] == "5"
    assert run.data.params["model.batch_size"] == "100" and run.data.params["split"] == "0.7/0.1/0.2"
    assert run.data.tags["dataset.sha256"] == __import__("hashlib").sha256(data.read_bytes()).hexdigest()
    for key in ("valid_tstr_ratio", "valid_ks", "loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4, 5]
    assert "Reporting training result" not in output  # Ray's per-checkpoint INFO lines are muted
    metrics = run.data.metrics
    assert 0.3 < metrics["test_tstr_ratio"] < 1.5 and 0.5 < metrics["test_trtr_auc"] <= 1
    assert 0 < metrics["test_ks_mean"] < 1 and metrics["test_dcr_median_ratio"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/evaluation.md",
        "evaluation/report.json",
        "evaluation/learning_curves.png",
        "evaluation/column_distances.png",
        "evaluation/synthetic_sample.parquet",
    } <= artifacts


def test_the_registered_gan_generates_users_in_the_feature_schema(trained_gan):
    import mlflow

    from shopsight.platform.mlflow_server import tracking_uri

    _, settings, data, _, _ = trained_gan
    mlflow.set_tracking_uri(tracking_uri(settings, start=False))
    model = mlflow.pyfunc.load_model("models:/shopsight-synthetic-users@challenger")
    wanted = pd.DataFrame({"buy_next_1d": [True] * 60 + [False] * 140})
    rows = model.predict(wanted, params={"seed": 3})
    real = pd.read_parquet(data)
    assert len(rows) == 200 and sorted(rows.columns) == sorted([*GENERATED, "buy_next_1d"])
    assert rows["buy_next_1d"].tolist() == wanted["buy_next_1d"].tolist()
    assert rows["n_pv_1d"].dtype == real["n_pv_1d"].dtype and (rows["n_pv_1d"] >= 0).all()
    assert set(rows["segment_id"]) <= set(real["segment_id"])
    assert 0 < rows["hours_since_buy"].isna().mean() < 1  # missing "hours since" come out as missing
    pd.testing.assert_frame_equal(rows, model.predict(wanted, params={"seed": 3}))
    assert not rows.equals(model.predict(wanted, params={"seed": 4}))


def test_gan_training_bad_inputs_fail_clearly(trained_gan, tmp_path):
    _, _, data, common, env = trained_gan

    def train(*args: str) -> tuple[int, str]:
        done = subprocess.run([*common, "train", "--model", "gan", *args], capture_output=True, text=True,
                              timeout=120, env=env)  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    code, output = train("--data", str(data), "--workers", "2")
    assert code != 0 and "one worker" in output and "Traceback" not in output
    unlabelled = tmp_path / "unlabelled.parquet"
    pd.read_parquet(data).drop(columns=["buy_next_1d"]).to_parquet(unlabelled)
    code, output = train("--data", str(unlabelled))
    assert code != 0 and "missing column(s) buy_next_1d" in output and "Traceback" not in output
    empty = tmp_path / "empty.parquet"
    pd.read_parquet(data).iloc[:0].to_parquet(empty)
    code, output = train("--data", str(empty))
    assert code != 0 and "empty" in output and "Traceback" not in output
    few = tmp_path / "few.parquet"
    purchase_frame(users=4, days=2).to_parquet(few, coerce_timestamps="us")
    code, output = train("--data", str(few))
    assert code != 0 and "too few to split" in output and "Traceback" not in output
