"""Promotion through the gate against a real MLflow server: the first champion, a worse challenger refused
with the confidence interval, a forced promotion recorded, rollback, two promotions at once, and what
`models list/show/history` print. Models are registered directly (no Ray): a SASRec trained a few epochs
on a learnable walk, and an untrained one (worse)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]

NAME = "shopsight-next-item"


def _pattern(path, users=300, seed=0):
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for user in range(1, users + 1):
            start = rng.integers(0, 40)
            f.writelines(f"{user} {100 + (start + t) % 40}\n" for t in range(12))


class Registry:
    """The module's MLflow server, its data, and how to register next-item versions like train.py does."""

    def __init__(self, folder, port):
        from shopsight.platform import load_settings
        from shopsight.training.next_item.data import LeaveOneOut, SequenceData

        self.folder = folder
        self.data = folder / "pattern.txt"
        _pattern(self.data)
        self.settings = load_settings(
            overrides={"data_dir": str(folder / "dd"), "mlflow.port": str(port)}, environ={}
        ).settings
        self.cli = [sys.executable, "-m", "shopsight", "--data-dir", str(folder / "dd"),
                    "--set", f"mlflow.port={port}"]  # fmt: skip
        self.env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"}
        self.sequences = SequenceData.from_file(self.data)
        self.split = LeaveOneOut.split(self.sequences)
        self.models = {}

    def start(self):
        import mlflow
        from mlflow import MlflowClient

        from shopsight.platform.mlflow_server import tracking_uri

        self.uri = tracking_uri(self.settings)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment("next-item")
        self.client = MlflowClient(self.uri)

    def model(self, trained: bool):
        import torch

        from shopsight.training.models import build_model
        from shopsight.training.next_item.fit import train_next_item
        from shopsight.training.runtime.loop import LoopConfig

        if trained not in self.models:
            torch.manual_seed(0)
            model = build_model("sasrec", n_items=self.sequences.n_items, max_len=10)
            if trained:
                cfg = LoopConfig(epochs=6, batch_size=32, lr=0.005, eval_every=2, eval_users=None)
                train_next_item(model, self.split, cfg, log=lambda *_: None)
            model.eval()
            self.models[trained] = model
        return self.models[trained]

    def register(self, trained: bool) -> str:
        """A new version of NAME (the challenger), with the run and version tags train.py sets."""
        import mlflow
        import pandas as pd

        from shopsight.training.next_item.evaluate import evaluate_next_item, scorer
        from shopsight.training.next_item.pyfunc import log_next_item_model, save_model_dir
        from shopsight.training.runtime.tracking import dataset_identity

        model = self.model(trained)
        identity = dataset_identity(self.data)
        test = evaluate_next_item(scorer(model), self.split, "test", 10)
        with mlflow.start_run(run_name="trained" if trained else "untrained"):
            mlflow.set_tags({**identity, "model": "sasrec", "task": "next-item"})
            mlflow.log_params({"model": "sasrec"})
            mlflow.log_metrics(
                {f"test_{k.replace('@', '_at_')}": v for k, v in test.items() if not k.startswith("_")}
            )
            folder = save_model_dir(self.folder / f"model_{time.time_ns()}", "sasrec", model,
                                    self.sequences.item_ids)  # fmt: skip
            example = pd.DataFrame({"item_ids": [[100, 101, 102], [120]]})
            info = log_next_item_model(folder, example, registered_name=NAME)
        version = str(info.registered_model_version)
        self.client.set_registered_model_alias(NAME, "challenger", version)
        self.client.set_model_version_tag(NAME, version, "model", "sasrec")
        self.client.set_model_version_tag(NAME, version, "dataset.sha256", identity["dataset.sha256"])
        return version

    def run(self, *args):
        """The command in this process (the imports are paid once), as `main()` would end it."""
        from typer.testing import CliRunner

        from shopsight.cli import app
        from shopsight.platform import ShopsightError, console

        width, console.width = console.width, 250
        try:
            result = CliRunner().invoke(app, [*self.cli[3:], *args])
        finally:
            console.width = width
        output, code = result.output, result.exit_code
        if isinstance(result.exception, ShopsightError):
            output += f"error: {result.exception}\n"
            code = result.exception.exit_code  # 3 for a refusal, as main() exits
        elif result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return subprocess.CompletedProcess(args, code, output, "")

    def run_process(self, *args, timeout=300):
        """The command as a user runs it: its own process, errors printed by `main()`."""
        return subprocess.run(
            [*self.cli, *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )

    def champion(self) -> str | None:
        return self.client.get_registered_model(NAME).aliases.get("champion")

    def history(self) -> list[dict]:
        from shopsight.lifecycle.registry import read_history

        return read_history(self.client, NAME)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, free_port):
    from shopsight.platform.mlflow_server import stop_local_server

    reg = Registry(tmp_path_factory.mktemp("promotion"), free_port())
    reg.start()
    yield reg
    stop_local_server(reg.settings)


def _rows(text: str, columns: int) -> list[list[str]]:
    """A rich table's rows as cells, a folded row's continuation lines joined into it."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if line.count("│") != columns + 1:
            continue
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells[0] or not rows:
            rows.append(cells)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
    return rows


def _out(result) -> str:
    return result.stdout + result.stderr


def _one_line_error(result, exit_code: int = 1) -> str:
    assert result.returncode == exit_code, _out(result)
    assert "Traceback" not in _out(result), _out(result)
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stdout
    return errors[0]


# --------------------------------------------------------------------------- no server needed


def test_paired_bootstrap_interval_covers_the_difference_and_one_class_resamples_are_skipped():
    from shopsight.training.runtime.versions import paired_bootstrap

    rng = np.random.default_rng(1)
    diff = rng.normal(0.1, 1.0, 2000)
    ci = paired_bootstrap(lambda idx: float(diff[idx].mean()), len(diff), 500, seed=0)
    assert (
        ci["lo"] < 0.1 < ci["hi"] and ci["hi"] - ci["lo"] < 0.2 and ci["mean"] == pytest.approx(diff.mean())
    )
    assert paired_bootstrap(lambda idx: float(diff[idx].mean()), len(diff), 500, seed=0) == ci  # seeded
    # a statistic undefined on some resamples (NaN) is summarised over the others
    skipped = paired_bootstrap(lambda idx: float("nan") if idx[0] % 2 else 1.0, 100, 200, seed=0)
    assert skipped["lo"] == skipped["hi"] == 1.0


def test_champion_stack_walks_back_through_rollbacks():
    from shopsight.lifecycle.registry import champion_stack

    history = [
        {"action": "promote", "from": None, "to": "1"},
        {"action": "promote", "from": "1", "to": "2"},
        {"action": "promote", "from": "2", "to": "3"},
        {"action": "rollback", "from": "3", "to": "2"},
    ]
    assert champion_stack(history) == ["1", "2"]
    assert champion_stack([*history, {"action": "rollback", "from": "2", "to": "1"}]) == ["1"]
    # a champion set before the history began is the bottom of the stack
    assert champion_stack([{"action": "promote", "from": "4", "to": "5"}]) == ["4", "5"]


# ------------------------------------------------------------------------------ real server


def test_first_promotion_sets_the_champion_and_freezes_the_evaluation_set(registry):
    version = registry.register(trained=True)
    result = registry.run("models", "promote", NAME)
    assert result.returncode == 0, _out(result)
    assert "Promoted" in result.stdout and "first champion" in result.stdout
    assert registry.champion() == version
    tags = registry.client.get_registered_model(NAME).tags
    assert tags["eval.sha256"] == hashlib.sha256(registry.data.read_bytes()).hexdigest()
    assert tags["eval.path"] == str(registry.data.absolute())
    (entry,) = registry.history()
    assert entry["action"] == "promote" and entry["from"] is None and entry["to"] == version
    assert entry["gate"] == "first" and entry["metrics"][version] > 0.5  # it learnt the walk
    assert "promotion.lock" not in tags


def test_a_worse_challenger_is_refused_with_the_interval_and_the_champion_stays(registry):
    champion = registry.champion()
    worse = registry.register(trained=False)
    result = registry.run("models", "promote", NAME)
    error = _one_line_error(result, exit_code=3)  # the gate's refusal, told apart from a failure (1)
    assert f"version {worse} refused" in error and "worse than the champion" in error
    assert "95% CI [" in result.stdout and "difference (candidate - champion)" in result.stdout
    line = next(row for row in result.stdout.splitlines() if row.startswith("difference"))
    mean = float(line.split(":")[1].split(",")[0])
    low, high = (float(x) for x in line.split("CI [")[1].split("]")[0].split(","))
    assert low <= mean <= high < -0.2  # the untrained model is far worse, and the interval says so
    assert registry.champion() == champion and len(registry.history()) == 1
    tags = registry.client.get_model_version(NAME, worse).tags
    assert tags["gate.status"] == "refused" and "worse" in tags["gate.reason"]


def test_force_needs_a_reason_and_a_forced_promotion_is_recorded(registry):
    previous, worse = registry.champion(), registry.client.get_registered_model(NAME).aliases["challenger"]
    no_reason = registry.run("models", "promote", NAME, "--force")
    assert no_reason.returncode == 2 and "--reason" in _out(no_reason)
    reason = "the frozen set predates the catalogue change"
    result = registry.run("models", "promote", NAME, "--version", worse, "--force", "--reason", reason)
    assert result.returncode == 0, _out(result)
    assert "forced:" in result.stdout and "95% CI" in result.stdout
    assert registry.champion() == worse
    entry = registry.history()[-1]
    assert (entry["from"], entry["to"], entry["forced"], entry["gate"], entry["reason"]) == (
        previous, worse, True, "overridden", reason,
    )  # fmt: skip
    assert entry["difference"]["hi"] < 0 and entry["metrics"][previous] > entry["metrics"][worse]
    assert entry["by"] and entry["at"].endswith("Z")
    tags = registry.client.get_model_version(NAME, worse).tags
    assert (
        tags["forced"] == "true" and tags["promotion_reason"] == reason and tags["promoted_from"] == previous
    )
    assert registry.client.get_model_version(NAME, previous).tags["replaced_by"] == worse


def test_rollback_restores_the_previous_champion_and_is_recorded(registry):
    forced, first = registry.champion(), registry.history()[-1]["from"]
    result = registry.run("models", "rollback", NAME, "--reason", "conversion dropped")
    assert result.returncode == 0, _out(result)
    assert "Rolled back" in result.stdout
    assert registry.champion() == first
    entry = registry.history()[-1]
    assert (entry["action"], entry["from"], entry["to"], entry["reason"]) == (
        "rollback", forced, first, "conversion dropped",
    )  # fmt: skip
    assert entry["metrics"][first] > entry["metrics"][forced]
    assert registry.client.get_model_version(NAME, forced).tags["rolled_back_by"] == entry["by"]
    again = _one_line_error(registry.run("models", "rollback", NAME))
    assert "no previous champion" in again and registry.champion() == first


def test_every_decision_is_a_run_of_the_promotions_experiment(registry):
    """The first promotion, the refusal, the forced promotion and the rollback so far: one run each in the
    MLflow experiment ``promotions``, with both evaluations, the interval, the decision, who and why, as the
    registry's history (the source of truth) records them."""
    import mlflow

    experiment = registry.client.get_experiment_by_name("promotions")
    runs = registry.client.search_runs(
        [experiment.experiment_id], f"tags.model = '{NAME}'", order_by=["attributes.start_time ASC"]
    )
    decisions = [(r.data.tags["action"], r.data.tags["decision"]) for r in runs]
    assert decisions == [("promote", "first"), ("promote", "refused"), ("promote", "overridden"),
                         ("rollback", "rollback")]  # fmt: skip
    first, refused, forced, rolled = runs
    history = registry.history()
    assert [r.data.tags.get("history.n") for r in runs] == [str(history[0]["n"]), None, str(history[1]["n"]),
                                                            str(history[2]["n"])]  # fmt: skip
    entry = history[1]  # the forced promotion: both evaluations and the interval, as the history has them
    metrics = forced.data.metrics
    assert metrics["candidate_ndcg_at_10"] == pytest.approx(entry["metrics"][entry["to"]])
    assert metrics["champion_ndcg_at_10"] == pytest.approx(entry["metrics"][entry["from"]])
    assert (metrics["difference"], metrics["difference_lo"], metrics["difference_hi"]) == pytest.approx(
        (entry["difference"]["mean"], entry["difference"]["lo"], entry["difference"]["hi"])
    )
    assert metrics["candidate_hr_at_10"] > 0
    assert metrics["candidate_users"] == metrics["champion_users"] == metrics["difference_units"] == 300
    tags = forced.data.tags
    assert (tags["by"], tags["mlflow.user"], tags["reason"], tags["forced"], tags["promoted"]) == (
        entry["by"], entry["by"], "the frozen set predates the catalogue change", "true", "true",
    )  # fmt: skip
    assert (tags["version.from"], tags["version.to"]) == (entry["from"], entry["to"])
    assert tags["check.loads"] == tags["check.inputs"] == tags["check.finite"] == "ok"
    assert forced.data.params["eval.sha256"] == history[0]["eval"]["sha256"]
    assert mlflow.artifacts.load_dict(f"runs:/{forced.info.run_id}/decision.json") == entry
    # the refusal moved nothing and says why; its interval lies below zero
    assert (
        refused.data.tags["promoted"] == "false" and "worse than the champion" in refused.data.tags["reason"]
    )
    assert refused.data.metrics["difference_hi"] < -0.2 < refused.data.metrics["champion_ndcg_at_10"]
    assert first.data.tags["version.from"] == "none" and "champion_ndcg_at_10" not in first.data.metrics
    # the rollback: the frozen-set values of the version restored and of the one rolled back
    back = history[2]
    assert (rolled.data.tags["version.from"], rolled.data.tags["version.to"]) == (back["from"], back["to"])
    assert rolled.data.tags["reason"] == "conversion dropped" and rolled.data.tags["by"] == back["by"]
    assert rolled.data.metrics["restored_ndcg_at_10"] == pytest.approx(back["metrics"][back["to"]])
    assert rolled.data.metrics["champion_ndcg_at_10"] == pytest.approx(back["metrics"][back["from"]])
    assert all(r.info.status == "FINISHED" for r in runs)


CONTENDER = """
import pathlib, sys, time
import mlflow, torch  # the slow imports happen before the start line
import shopsight.lifecycle.promotion, shopsight.features.definitions
from shopsight.cli import main
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.002)
sys.argv = ["shopsight", *sys.argv[3:]]
main()
"""


def test_two_promotions_at_once_one_wins_the_other_fails_clearly(registry, tmp_path):
    champion, entries = registry.champion(), len(registry.history())
    versions = [registry.register(trained=True), registry.register(trained=True)]
    go = tmp_path / "go"
    # each process pays its imports first, then waits for the same start line: truly at once
    command = [*registry.cli[3:], "--set", "promotion.lock_settle_s=3", "models", "promote", NAME]
    contender = [sys.executable, "-c", CONTENDER]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": registry.env}
    processes = [
        subprocess.Popen(
            [*contender, str(tmp_path / f"ready{k}"), str(go), *command, "--version", version], **pipes
        )
        for k, version in enumerate(versions)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{k}").exists() for k in range(2)) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [(p.returncode, out + err) for p in processes for out, err in [p.communicate(timeout=300)]]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    (winner,) = [v for v, (code, _) in zip(versions, results, strict=True) if code == 0]
    (loser_output,) = [out for code, out in results if code == 1]
    assert f"another promotion of {NAME} is in progress (version " in loser_output
    assert ", since " in loser_output and "Traceback" not in loser_output
    assert [line for line in loser_output.splitlines() if line.startswith("error:")] == [
        line for line in loser_output.splitlines() if "is in progress" in line
    ]
    # one consistent registry: the winner is champion, one new history entry saying so, no lock left
    assert registry.champion() == winner
    history = registry.history()
    assert len(history) == entries + 1 and (history[-1]["from"], history[-1]["to"]) == (champion, winner)
    assert "promotion.lock" not in registry.client.get_registered_model(NAME).tags


def test_list_show_and_history_print_the_facts(registry):
    import getpass

    listed = registry.run("models", "list")
    assert listed.returncode == 0, _out(listed)
    (row,) = [cells for cells in _rows(listed.stdout, 5) if cells[0] == NAME]
    assert row[1] == "1, 2, 3, 4" and row[3] == "next-item"  # the task from the versions' runs
    assert row[2] == f"challenger -> 4, champion -> {registry.champion()}"
    shown = registry.run("models", "show", NAME)
    assert shown.returncode == 0, _out(shown)
    sha = hashlib.sha256(registry.data.read_bytes()).hexdigest()[:12]
    rows = {cells[0]: " ".join(cells) for cells in _rows(shown.stdout, 9)}
    assert set(rows) == {"1", "2", "3", "4"}
    assert "champion" in rows[registry.champion()] and "NDCG@10" in rows["1"] and "sasrec" in rows["1"]
    assert getpass.getuser() in rows["1"] and "next-item" in rows["2"] and f"(sha256 {sha})" in shown.stdout
    assert "(forced)" in rows["2"] and "rolled back" in rows["2"]
    assert f"frozen evaluation set: {registry.data.absolute()} (sha256 {sha}" in shown.stdout
    history = registry.run("models", "history", NAME)
    assert history.returncode == 0, _out(history)
    entries = _rows(history.stdout, 9)
    assert [cells[3] for cells in entries] == ["promote", "promote", "rollback", "promote"]
    assert [cells[4] for cells in entries][:3] == ["- -> 1", "1 -> 2", "2 -> 1"]
    forced = entries[1]
    assert forced[7] == "yes" and forced[8] == "the frozen set predates the catalogue change"
    assert "ndcg@10" in forced[5] and "[" in forced[6] and entries[2][8] == "conversion dropped"


def test_list_show_and_history_as_json_for_scripts(registry):
    """The same facts with -o json: raw values under stable keys, alone on stdout."""
    import json

    def data(*args):
        result = registry.run_process(*args, "-o", "json")
        assert result.returncode == 0, _out(result)
        return json.loads(result.stdout)

    champion = registry.champion()
    aliases = {alias: int(v) for alias, v in registry.client.get_registered_model(NAME).aliases.items()}
    assert aliases["champion"] == int(champion)
    (listed,) = [r for r in data("models", "list") if r["name"] == NAME]
    assert list(listed) == ["name", "versions", "aliases", "tasks", "latest_version_created"]
    assert listed["versions"] == [1, 2, 3, 4] and listed["tasks"] == ["next-item"]
    assert listed["aliases"] == aliases and aliases["challenger"] == 4
    assert listed["latest_version_created"].endswith("Z")  # ISO 8601 UTC, as the history's times

    shown = data("models", "show", NAME)
    assert list(shown) == ["name", "versions", "evaluation_set", "lock"] and shown["lock"] is None
    assert [v["version"] for v in shown["versions"]] == [1, 2, 3, 4]
    first, forced = shown["versions"][0], shown["versions"][1]
    assert list(first) == ["version", "aliases", "task", "model_type", "test_metrics", "dataset",
                           "created_by", "created_at", "run_id", "promotion"]  # fmt: skip
    assert first["model_type"] == "sasrec" and 0 < first["test_metrics"]["ndcg_at_10"] <= 1
    assert forced["promotion"]["forced"] is True and forced["promotion"]["rolled_back_at"]
    champions_aliases = sorted(alias for alias, v in aliases.items() if v == int(champion))
    assert sorted(shown["versions"][int(champion) - 1]["aliases"]) == champions_aliases
    assert len(shown["evaluation_set"]["sha256"]) == 64 and shown["evaluation_set"]["path"]

    history = data("models", "history", NAME)
    assert [(e["action"], e["from"], e["to"], e["forced"]) for e in history] == [
        (e["action"], e["from"], e["to"], bool(e.get("forced"))) for e in registry.history()
    ]
    assert list(history[0])[:6] == ["n", "at", "by", "action", "from", "to"]
    assert history[1]["reason"] == "the frozen set predates the catalogue change"
    assert (
        history[1]["difference"]["lo"] <= history[1]["difference"]["mean"] <= history[1]["difference"]["hi"]
    )


def test_unknown_names_and_a_changed_evaluation_set_fail_clearly(registry):
    unknown = _one_line_error(registry.run("models", "show", "no-such-model"))
    assert "no registered model 'no-such-model'" in unknown and NAME in unknown
    missing = _one_line_error(registry.run("models", "promote", NAME, "--version", "99"))
    assert "has no version '99'" in missing
    with registry.data.open("a") as f:
        f.write("301 100\n301 101\n301 102\n")
    candidate = registry.register(trained=True)  # trained on the new content, yet the frozen set rules
    changed = _one_line_error(registry.run("models", "promote", NAME, "--version", candidate))
    assert "frozen evaluation set" in changed and "changed" in changed


def _purchase_versions(registry, name: str, frame):
    """``register(trained, extra_column=False)``: a new purchase version of ``name`` trained on ``frame``
    (``extra_column``: fitted on a column the feature service lacks), tagged as train.py tags it."""
    import mlflow
    import torch

    from shopsight.training.binary.data import SnapshotFeatures, TimeSplit
    from shopsight.training.binary.fit import train_binary
    from shopsight.training.binary.pyfunc import input_example, log_snapshot_model, save_model_dir
    from shopsight.training.models import build_model
    from shopsight.training.runtime.loop import LoopConfig
    from shopsight.training.runtime.tracking import dataset_identity

    data = registry.folder / f"{name}.parquet"
    frame.to_parquet(data)
    identity = dataset_identity(data)

    def register(trained: bool, extra_column: bool = False) -> str:
        rows = frame.assign(n_secret_1d=1) if extra_column else frame
        split = TimeSplit.of(rows)
        features = SnapshotFeatures.fit(split.train, max_len=20)
        torch.manual_seed(0)
        model = build_model(
            "sasrec", n_items=features.n_items, n_dense=features.n_dense,
            n_categories=features.n_categories, max_len=20, d_model=16,
        )  # fmt: skip
        if trained:
            train_binary(
                model, features.transform(split.train), features.transform(split.valid),
                LoopConfig(epochs=3, batch_size=64, lr=3e-3, eval_every=1), log=lambda _: None,
            )  # fmt: skip
        mlflow.set_experiment("purchase")
        with mlflow.start_run():
            mlflow.set_tags({**identity, "model": "sasrec", "task": "purchase"})
            folder = save_model_dir(registry.folder / f"purchase_{time.time_ns()}", "sasrec", model, features)
            info = log_snapshot_model(folder, input_example(split.test.head(5)), registered_name=name)
        version = str(info.registered_model_version)
        for key, value in {"task": "purchase", "model": "sasrec", **identity}.items():
            registry.client.set_model_version_tag(name, version, key, value)
        return version

    return register


def test_purchase_gate_checks_inputs_against_the_feature_service_and_compares_roc_auc(registry):
    """The purchase task through the Python API: ROC-AUC on the last snapshot day, rows paired; a model
    fitted on a column the feature service lacks is refused even with --force."""
    from tests.conftest import purchase_frame

    from shopsight.lifecycle.promotion import promote

    name = "shopsight-purchase"
    register = _purchase_versions(registry, name, purchase_frame(users=200, days=4))

    first = promote(registry.settings, name, register(trained=True), log=lambda _: None)
    assert first.promoted and first.entry["gate"] == "first" and first.metric == "roc_auc"
    assert first.candidate_eval.checks["inputs"] == (True, first.candidate_eval.checks["inputs"][1])
    assert "all fields of purchase_propensity_v1" in first.candidate_eval.checks["inputs"][1]
    assert first.candidate_eval.metrics["roc_auc"] > 0.7

    worse = promote(registry.settings, name, register(trained=False), log=lambda _: None)
    assert not worse.promoted and "ROC-AUC" in worse.reasons[0]
    assert worse.difference["units"] == first.candidate_eval.metrics["n"]  # every test-day row, paired
    assert worse.difference["lo"] <= worse.difference["mean"] <= worse.difference["hi"] < 0

    unserved = register(trained=False, extra_column=True)
    forced = promote(registry.settings, name, unserved, force=True, reason="try", log=lambda _: None)
    assert not forced.promoted and "n_secret_1d" in forced.reasons[0]
    assert "not fields of purchase_propensity_v1" in forced.reasons[0]
    assert registry.client.get_registered_model(name).aliases["champion"] == first.candidate


def test_churn_is_gated_through_the_table_and_its_calibration_is_held_to_the_champions(registry):
    """Churn, added through the task table alone, passes the same gate: its own service, its ROC-AUC on
    rows; and a candidate that ranks exactly as well (the same network) but whose probabilities mean
    less (a calibration that inflates them) is refused on its calibration error."""
    import mlflow
    import torch
    from tests.conftest import purchase_frame

    from shopsight.lifecycle.promotion import promote
    from shopsight.training.binary.calibration import Calibration
    from shopsight.training.binary.data import SnapshotFeatures, TimeSplit
    from shopsight.training.binary.fit import predict_probabilities, train_binary
    from shopsight.training.binary.pyfunc import input_example, log_snapshot_model, save_model_dir
    from shopsight.training.models import build_model
    from shopsight.training.runtime.loop import LoopConfig
    from shopsight.training.runtime.tracking import dataset_identity

    name = "shopsight-churn"
    frame = purchase_frame(users=300, days=5, seed=3).rename(columns={"buy_next_1d": "churn_3d"})
    data = registry.folder / "churn.parquet"
    frame.to_parquet(data)
    identity = dataset_identity(data)
    split = TimeSplit.of(frame)
    features = SnapshotFeatures.fit(split.train, max_len=20)
    torch.manual_seed(0)
    model = build_model(
        "sasrec", n_items=features.n_items, n_dense=features.n_dense,
        n_categories=features.n_categories, max_len=20, d_model=16,
    )  # fmt: skip
    valid = features.transform(split.valid)
    train_binary(
        model, features.transform(split.train), valid, LoopConfig(epochs=3, batch_size=64, lr=3e-3),
        pos_weight=4.0, log=lambda _: None,
    )  # fmt: skip
    fitted = Calibration.fit(predict_probabilities(model, valid), valid.labels, "platt")
    inflated = Calibration("platt", slope=fitted.slope, intercept=fitted.intercept + 2.0)  # same order

    def register(calibration: Calibration) -> str:
        mlflow.set_experiment("churn")
        with mlflow.start_run():
            mlflow.set_tags({**identity, "model": "sasrec", "task": "churn"})
            folder = save_model_dir(
                registry.folder / f"churn_{time.time_ns()}", "sasrec", model, features, calibration
            )
            info = log_snapshot_model(folder, input_example(split.test.head(5)), registered_name=name)
        version = str(info.registered_model_version)
        for key, value in {"task": "churn", "model": "sasrec", **identity}.items():
            registry.client.set_model_version_tag(name, version, key, value)
        return version

    first = promote(registry.settings, name, register(fitted), log=lambda _: None)
    assert first.promoted and first.task == "churn" and first.metric == "roc_auc"
    assert "all fields of churn_risk_v1" in first.candidate_eval.checks["inputs"][1]
    calibrated_ece = first.candidate_eval.metrics["ece"]
    assert calibrated_ece < 0.1 and first.candidate_eval.metrics["roc_auc"] > 0.7

    worse = promote(registry.settings, name, register(inflated), log=lambda _: None)
    assert worse.difference["mean"] == pytest.approx(0.0, abs=1e-9)  # the same ranking, row for row
    assert not worse.promoted and len(worse.reasons) == 1 and "ECE" in worse.reasons[0]
    assert worse.candidate_eval.metrics["ece"] > calibrated_ece + 0.02
    assert registry.client.get_registered_model(name).aliases["champion"] == first.candidate


def test_the_demo_bootstraps_a_champion_through_the_gate_or_says_why_it_serves_none(registry):
    """Without a champion the demo promotes the challenger through the gate (a history entry, so that a
    rollback works later); a challenger that fails a check nothing may override is never served."""
    from tests.conftest import purchase_frame

    from shopsight.cli.serve import ensure_champion
    from shopsight.lifecycle.registry import read_history
    from shopsight.platform import ShopsightError

    register = _purchase_versions(registry, "shopsight-bootstrap", purchase_frame(users=120, days=4))
    unserved = register(trained=False, extra_column=True)
    registry.client.set_registered_model_alias("shopsight-bootstrap", "challenger", unserved)
    refused = f"refused version {unserved}, so there is no champion to serve.*n_secret_1d"
    with pytest.raises(ShopsightError, match=refused):
        ensure_champion(registry.settings, registry.client, "shopsight-bootstrap")
    assert "champion" not in registry.client.get_registered_model("shopsight-bootstrap").aliases
    assert read_history(registry.client, "shopsight-bootstrap") == []

    good = register(trained=True)
    registry.client.set_registered_model_alias("shopsight-bootstrap", "challenger", good)
    assert ensure_champion(registry.settings, registry.client, "shopsight-bootstrap") == good
    (entry,) = read_history(registry.client, "shopsight-bootstrap")
    assert (entry["action"], entry["to"], entry["gate"]) == ("promote", good, "first")
    assert ensure_champion(registry.settings, registry.client, "shopsight-bootstrap") == good  # kept


def test_a_decision_stands_when_its_run_cannot_be_written(registry):
    """With the ``promotions`` experiment deleted (a run cannot be created in it), a rollback still moves
    the champion and is recorded in the registry; the missing run is one warning."""
    from shopsight.lifecycle.promotion import rollback

    experiment = registry.client.get_experiment_by_name("promotions")
    champion, said = registry.champion(), []
    registry.client.delete_experiment(experiment.experiment_id)
    try:
        entry = rollback(registry.settings, NAME, "the experiment is gone", log=said.append)
    finally:
        registry.client.restore_experiment(experiment.experiment_id)
    assert registry.champion() == entry["to"] != champion and registry.history()[-1] == entry
    (warning,) = [line for line in said if line.startswith("warning:")]
    assert "the decision stands" in warning and "'promotions' could not be written" in warning
    runs = registry.client.search_runs([experiment.experiment_id], "tags.reason = 'the experiment is gone'")
    assert runs == []
