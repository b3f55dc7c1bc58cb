"""Ray Tune around Ray Train: Optuna search, ASHA stops weak trials, every trial an MLflow child run."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from shopsight.training.runtime.loop import LoopConfig

pytestmark = [pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]

TRIALS, EPOCHS = 4, 4


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def pattern_file(tmp_path_factory):
    """200 users, each walking items i, i+1, ...: learnable, so good and bad trials differ clearly."""
    path = tmp_path_factory.mktemp("tune_data") / "pattern.txt"
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for user in range(1, 201):
            start = rng.integers(0, 40)
            f.writelines(f"{user} {100 + (start + t) % 40}\n" for t in range(12))
    return path


@pytest.fixture(scope="module")
def swept(ray_local, pattern_file, tmp_path_factory, make_settings, free_port):
    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import stop_local_server, tracking_uri
    from shopsight.training.next_item.train import prepare
    from shopsight.training.runtime.tune import tune_model

    settings = make_settings(tmp_path_factory.mktemp("tune"), **{"mlflow.port": str(free_port())})
    lines: list[str] = []
    started = time.perf_counter()
    prepared = prepare(settings, "sasrec", pattern_file, model_config={"max_len": 10})
    summary = tune_model(
        settings,
        prepared,
        TRIALS,
        EPOCHS,
        seed=0,
        loop=LoopConfig(batch_size=32),
        max_concurrent=1,  # one Train run at a time on 2 CPUs: ASHA's decisions do not depend on timing
        run_name="sweep",
        log=lines.append,
    )
    seconds = time.perf_counter() - started
    yield summary, MlflowClient(tracking_uri(settings, start=False)), lines, seconds
    stop_local_server(settings)


def _children(client, summary):
    parent = client.get_run(summary.parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}'"
    )


def test_every_trial_is_a_child_run_with_its_params_and_epochs(swept, pattern_file):
    summary, client, lines, _ = swept
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["kind"] == "tune" and parent.info.status == "FINISHED"
    sha = __import__("hashlib").sha256(pattern_file.read_bytes()).hexdigest()
    assert parent.data.tags["dataset.sha256"] == sha
    children = _children(client, summary)
    assert len(children) == TRIALS
    assert {run.info.run_id for run in children} == {row.run_id for row in summary.trials}
    for run in children:
        params = run.data.params
        assert {"model.d_model", "model.n_blocks", "model.dropout", "model.loss", "loop.lr"} <= set(params)
        assert params["model"] == "sasrec" and params["model.max_len"] == "10"
        assert run.data.tags["dataset.sha256"] == sha and run.info.status == "FINISHED"
        epochs = int(run.data.tags["tune.epochs"])
        for key in ("loss", "valid_ndcg_at_10", "valid_hr_at_10"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == list(range(1, epochs + 1)), key
    # one progress line per finished trial
    assert sum(line.startswith("trial ") for line in lines) == TRIALS


def test_asha_stops_weak_trials_early_and_records_it(swept):
    summary, client, _, _ = swept
    children = {run.info.run_id: run for run in _children(client, summary)}
    stopped = [row for row in summary.trials if row.status == "stopped early"]
    assert stopped, "ASHA stopped no trial"
    for row in summary.trials:
        tags = children[row.run_id].data.tags
        assert tags["tune.early_stopped"] == str(row.status == "stopped early").lower()
        assert int(tags["tune.epochs"]) == row.epochs
    for row in stopped:
        assert row.epochs < EPOCHS
        # the child run holds exactly the epochs ASHA judged, not those its workers ran meanwhile
        history = client.get_metric_history(row.run_id, "valid_ndcg_at_10")
        assert len(history) == row.epochs
        assert max(m.value for m in history) < summary.best_valid
    assert any(row.status == "completed" and row.epochs == EPOCHS for row in summary.trials)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.metrics["trials_stopped_early"] == len(stopped)


def test_the_best_trial_is_registered_as_challenger(swept):
    summary, client, _, _ = swept
    best_by_history = max(
        summary.trials,
        key=lambda row: max(m.value for m in client.get_metric_history(row.run_id, "valid_ndcg_at_10")),
    )
    assert summary.best_run_id == best_by_history.run_id
    version = client.get_model_version_by_alias("shopsight-next-item", "challenger")
    assert version.version == summary.version and version.run_id == summary.best_run_id
    assert version.tags["tune.parent_run_id"] == summary.parent_run_id
    best = client.get_run(summary.best_run_id)
    assert best.data.metrics["test_hr_at_10"] > 0.9 > best.data.metrics["popularity_hr_at_10"]
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["tune.best_run_id"] == summary.best_run_id
    assert parent.data.params["best.model.d_model"] == str(summary.best_params["d_model"])
    assert parent.data.metrics["best_valid_ndcg_at_10"] == pytest.approx(summary.best_valid)
    assert parent.data.metrics["test_hr_at_10"] == pytest.approx(summary.test["hr@10"])
    table = client.download_artifacts(summary.parent_run_id, "tune/trials.csv")
    with open(table) as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    assert len(rows) == TRIALS and {r["run_id"] for r in rows} == {t.run_id for t in summary.trials}


def test_stopped_trials_give_their_cpus_back(swept):
    import ray

    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_bad_model_name_gives_one_line_error(tmp_path, pattern_file):
    result = subprocess.run(
        [sys.executable, "-m", "shopsight", "--data-dir", str(tmp_path / "dd"), "tune", "--model", "gpt",
         "--data", str(pattern_file), "--trials", "2"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    # a usage error (exit 2) from the parser, on stderr, naming the value and the choices
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert result.stdout == "" and "'gpt'" in result.stderr and "sasrec" in result.stderr, result.stderr
    assert not (tmp_path / "dd" / "mlflow").exists(), "nothing was started for a bad model name"
