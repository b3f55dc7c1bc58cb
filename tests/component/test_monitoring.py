"""The loop closed on simulated data, with real engines: Spark features, Feast (SQLite online store and its
file offline store), MLflow models; answers served in process with the prediction log on, the world
simulated on, and the monitor run on what followed.

The simulator knows the true outcome probabilities, so the monitor itself is checked against the truth:
its online ROC-AUC must hold the oracle's expected ROC-AUC of the same answers within its own interval;
drift injected into the simulation on a day must be flagged on that day and not on the day before; a
feature broken on the serving side must show as skew."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from datetime import date, datetime
from pathlib import Path

import pytest
from tests.component.test_serving import _register_snapshot_model
from tests.conftest import installed

from shopsight.data import SimulatorConfig, continue_simulation, simulate
from shopsight.features import store
from shopsight.features.build import build_features
from shopsight.monitoring.monitor import day_window, end_of_day, run
from shopsight.serving.app import LocalBackend
from shopsight.serving.prediction_log import PredictionLog, RequestContext, prediction_log_destination
from shopsight.serving.predictor import ProbabilityPredictor, Routing
from shopsight.serving.schemas import PropensityRequest
from shopsight.training.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]
USERS = 1500
FIRST, LAST = date(2017, 11, 25), date(2017, 12, 3)  # nine simulated days
TIMEZONE = "Asia/Shanghai"
BROKEN = "n_pv_7d"  # churn is served with this feature doubled: a transformation on one side only


class Doubled:
    """A feature reader that serves one feature wrong (doubled): skew the monitor must find."""

    def __init__(self, reader, name: str) -> None:
        self.reader, self.name = reader, name
        self.feature_names = reader.feature_names

    def read(self, user_ids):
        values = self.reader.read(user_ids)
        values[self.name] = [None if v is None else 2 * v for v in values[self.name]]
        return values


def _end_of(day: date) -> datetime:
    return end_of_day(day.isoformat(), TIMEZONE)


def _predictors(settings, as_of: datetime, tasks: dict[str, object]) -> dict:
    """The tasks' predictors as a replica builds them (the champion and challenger from MLflow, the Feast
    online store), answering as of ``as_of``; ``tasks``: name -> a wrapper of its feature reader, or None."""
    from shopsight.features.online import OnlineFeatureReader
    from shopsight.platform.mlflow_server import tracking_uri
    from shopsight.serving.models import MlflowModelSource
    from shopsight.serving.predictor import ModelWatcher

    predictors = {}
    for name, wrap in tasks.items():
        task = get_task(name)
        reader = OnlineFeatureReader(settings, task.route.service, None)
        predictor = ProbabilityPredictor(
            wrap(reader) if wrap else reader, task.registered_model, Routing(shadow=True), clock=lambda: as_of
        )
        source = MlflowModelSource(
            tracking_uri(settings), task.registered_model, task.pyfunc.load_class(), None
        )
        ModelWatcher(predictor, source).poll_once()
        predictors[name] = predictor
    return predictors


def _serve(settings, day: date, tasks: dict[str, object]) -> int:
    """Every user's answers of the tasks, as of the end of ``day``, through the serving path with the
    prediction log on (rolled when done); returns the requests sent."""
    destination, _ = prediction_log_destination(settings)
    answers_log = PredictionLog(settings.data_dir / "prediction-spool", destination, roll_interval_s=0)
    predictors = _predictors(settings, _end_of(day), tasks)
    backend = LocalBackend(predictors, answers_log)
    sent = 0
    for name in predictors:
        for first in range(1, USERS + 1, 20):
            request = PropensityRequest(user_ids=list(range(first, min(first + 20, USERS + 1))))
            context = RequestContext(f"{name}-{day}-{first}", "team_a")
            assert asyncio.run(backend.answer(name, request, context)).status == 200
            sent += 1
    answers_log.close()
    return sent


@pytest.fixture(scope="module")
def world(spark, make_settings, free_port, tmp_path_factory):
    """Nine simulated days with features, a purchase champion (v1) and challenger (v2, scored in shadow)
    and a churn champion; every user answered as of the end of day 9 (churn with a broken feature), then
    a tenth day simulated with three times the add-to-carts, then two more ordinary days."""
    import mlflow
    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import stop_local_server, tracking_uri

    tmp = tmp_path_factory.mktemp("monitoring")
    settings = make_settings(
        tmp,
        **{
            "monitoring.skew_sample": "60",
            "promotion.bootstrap_samples": "400",
            "mlflow.port": str(free_port()),
        },
    )
    events = tmp / "simulated"
    simulate(SimulatorConfig(users=USERS, days=9, seed=5, start=FIRST, timezone=TIMEZONE), events)
    try:
        build_features(settings, events / "events", FIRST, LAST)
        store.apply(settings)
        store.materialize(settings)
        mlflow.set_tracking_uri(tracking_uri(settings))
        mlflow.set_experiment("monitoring-test")
        client = MlflowClient(tracking_uri(settings))
        versions = {}
        for name, copies in (("purchase", 2), ("churn", 1)):
            task = get_task(name)
            for copy in range(copies):
                # the purchase challenger learns from shuffled labels: worse than the champion
                version = _register_snapshot_model(settings, tmp / f"{name}-{copy}", name, shuffled=copy == 1)
                run_id = client.get_model_version(task.registered_model, version).run_id
                client.set_tag(
                    run_id, "dataset.path", str(tmp / f"{name}-{copy}" / f"training_set_{name}.parquet")
                )
                versions[(name, copy)] = version
            client.set_registered_model_alias(task.registered_model, "champion", versions[(name, 0)])
        client.set_registered_model_alias("shopsight-purchase", "challenger", versions[("purchase", 1)])
        served = _serve(settings, LAST, {"purchase": None, "churn": lambda r: Doubled(r, BROKEN)})
        continue_simulation(events, 1, shift={"p_cart": 0.174})  # three times the carts on day 10
        continue_simulation(events, 2)
        yield {"settings": settings, "events": events, "versions": versions, "served": served}
    finally:
        stop_local_server(settings)


def test_the_monitor_joins_every_answer_and_its_numbers_hold_the_truth(world):
    settings, events = world["settings"], world["events"]
    start, end = day_window(LAST.isoformat(), TIMEZONE)
    report = run(settings, events=events, start=start, end=end)
    purchase = {v.alias: v for v in next(t for t in report.tasks if t.task == "purchase").versions}
    assert set(purchase) == {"champion", "shadow"}
    champion = purchase["champion"]
    # every user answered once by each; the next day is simulated, so every purchase answer is labelled
    assert champion.answers == champion.labelled == USERS and champion.pending == 0
    auc = champion.metrics["roc_auc"]
    assert 0.5 < auc.value < 1 and auc.lo < auc.value < auc.hi
    # the check no anchor has: the oracle's true probabilities say what ROC-AUC these very scores should
    # reach, and the monitor's own interval holds it
    assert auc.lo <= champion.oracle["roc_auc"] <= auc.hi, (auc, champion.oracle)
    assert {"ece", "brier"} <= set(champion.metrics)
    (comparison,) = next(t for t in report.tasks if t.task == "purchase").comparisons
    assert comparison.paired and comparison.units == USERS and comparison.alias == "shadow"
    assert comparison.difference.lo <= comparison.difference.value <= comparison.difference.hi
    churn = next(t for t in report.tasks if t.task == "churn")
    churned = {v.alias: v for v in churn.versions}["champion"]
    assert churned.labelled == USERS  # three more days were simulated: its horizon is over
    assert churned.metrics["roc_auc"].lo <= churned.oracle["roc_auc"] <= churned.metrics["roc_auc"].hi
    # skew: the feature churn was served wrong is caught, every other one (and purchase's) is clean
    skew = {s.feature: s.mismatch_rate for s in churn.skew}
    assert skew[BROKEN] > 0.5 and all(rate == 0 for name, rate in skew.items() if name != BROKEN), skew
    purchase_skew = next(t for t in report.tasks if t.task == "purchase").skew
    assert purchase_skew and all(s.mismatch_rate == 0 for s in purchase_skew)
    assert any(f"feature {BROKEN} is served unlike the offline store" in line for line in report.alerts)
    # before the shift: no cart feature drifted
    drifted = {d.feature: d.psi for d in next(t for t in report.tasks if t.task == "purchase").drift}
    assert drifted and drifted["n_cart_1d"] < settings.monitoring.max_psi
    # and in MLflow: one run, its metrics, plots and report
    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import tracking_uri

    run_data = MlflowClient(tracking_uri(settings)).get_run(report.run_id).data
    key = f"purchase.champion.v{champion.version}.roc_auc"
    assert run_data.metrics[key] == pytest.approx(auc.value)
    assert run_data.metrics["alerts"] == len(report.alerts)
    artifacts = {a.path for a in MlflowClient(tracking_uri(settings)).list_artifacts(report.run_id, "plots")}
    assert {
        "plots/purchase-roc_auc-over-time.png",
        "plots/purchase-reliability.png",
        "plots/purchase-drift.png",
    } <= artifacts
    assert report.html_path.exists() and "Alerts" in report.html_path.read_text()
    prometheus = (settings.data_dir.absolute() / "monitor" / "monitor.prom").read_text()
    assert f'shopsight_feature_skew{{feature="{BROKEN}",task="churn"}}' in prometheus
    _looked_at_in_a_browser(report.html_path, report.run_id, settings)


def _looked_at_in_a_browser(page, run_id: str, settings) -> None:
    """The report as a person sees it, in headless Chromium: its text holds the alerts and every table,
    its images render; the screenshot is kept beside it and in the monitoring run."""
    import re

    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import tracking_uri

    browser = installed("chromium", "chromium-browser", package="chromium")
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={page.parent / 'chromium'}", "--window-size=1200,2400"]  # fmt: skip
    url = page.absolute().as_uri()
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    screenshot = page.with_name("report.png")
    shot = subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom.stdout))
    assert "Alerts" in text and f"feature {BROKEN} is served unlike the offline store" in text
    assert "purchase" in text and "churn" in text and "oracle ROC-AUC" in text
    assert dom.stdout.count("<img") >= 4  # the plots, embedded
    assert screenshot.stat().st_size > 50_000  # a rendered page with its plots, not a blank one
    MlflowClient(tracking_uri(settings)).log_artifact(run_id, str(screenshot))


def test_drift_injected_on_a_day_is_flagged_on_that_day_and_not_before(world):
    settings, events = world["settings"], world["events"]
    shifted = date(2017, 12, 4)
    build_features(settings, events / "events", FIRST, shifted)  # the features of day 10 too
    store.materialize(settings)
    _serve(settings, shifted, {"purchase": None})
    before, on_the_day = (
        run(settings, events=events, tasks=["purchase"], start=start, end=end, track=False)
        for start, end in (day_window(d.isoformat(), TIMEZONE) for d in (LAST, shifted))
    )
    carts_before = {d.feature: d.psi for d in before.tasks[0].drift}["n_cart_1d"]
    carts_then = {d.feature: d.psi for d in on_the_day.tasks[0].drift}["n_cart_1d"]
    assert carts_before < settings.monitoring.max_psi < carts_then, (carts_before, carts_then)
    assert any("feature n_cart_1d drifted" in line for line in on_the_day.alerts)
    assert not any("n_cart_1d" in line for line in before.alerts)
    # the tenth day's purchase answers have their next day simulated: labelled too
    assert on_the_day.tasks[0].versions[0].labelled == USERS
    assert json.loads(json.dumps(on_the_day.as_dict()))["tasks"][0]["task"] == "purchase"


def _shopsight(settings, *args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it, on the world's settings."""
    overrides = ["--set", f"mlflow.port={settings.mlflow.port}", "--set", "promotion.bootstrap_samples=400",
                 "--set", "monitoring.skew_sample=60", "--set", f"data.timezone={TIMEZONE}"]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SHOPSIGHT_")}
    return subprocess.run(
        [sys.executable, "-m", "shopsight", "--data-dir", str(settings.data_dir), *overrides, *args],
        capture_output=True, text=True, timeout=600, env=environ,
    )  # fmt: skip


def test_the_command_prints_one_line_per_breach_and_exits_3(world):
    day, events = LAST.isoformat(), str(world["events"])
    done = _shopsight(world["settings"], "monitor", "--day", day, "--data", events, "--task", "churn",
                      "--no-track", "-o", "json")  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert [t["task"] for t in report["tasks"]] == ["churn"]
    breaches = [line for line in done.stderr.splitlines() if line.startswith("alert: ")]
    assert breaches == [f"alert: {line}" for line in report["alerts"]] and breaches
    assert any(f"feature {BROKEN} is served unlike the offline store" in line for line in breaches)


def test_online_promotion_refuses_a_worse_challenger_and_records_why(world):
    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import tracking_uri

    settings, versions = world["settings"], world["versions"]
    client = MlflowClient(tracking_uri(settings))
    name = "shopsight-purchase"
    events = ["--data", str(world["events"])]
    # a day with no answers: nothing to judge the challenger on
    empty = _shopsight(settings, "models", "promote", name, "--online", "--day", "2017-11-30", *events)
    assert empty.returncode == 3 and "no labelled answers" in empty.stderr, empty.stderr[-2000:]
    refused = _shopsight(settings, "models", "promote", name, "--online", "--day", LAST.isoformat(), *events,
                         "-o", "json")  # fmt: skip
    assert refused.returncode == 3, refused.stderr[-2000:]
    record = json.loads(refused.stdout)
    assert record["evaluation_set"]["path"].startswith("online: answers as of")
    assert record["difference"]["mean"] < -settings.promotion.tolerance and not record["promoted"]
    assert "online roc_auc" in refused.stderr and "is worse than the champion's" in refused.stderr
    challenger = versions[("purchase", 1)]
    assert client.get_model_version(name, challenger).tags["gate.status"] == "refused"
    assert client.get_registered_model(name).aliases["champion"] == versions[("purchase", 0)]
    runs = client.search_runs(
        [client.get_experiment_by_name("promotions").experiment_id], "tags.decision = 'refused'"
    )
    assert any(r.data.params.get("eval.path", "").startswith("online:") for r in runs)
    # no challenger beside the churn champion: a clear error, not a decision
    churn = _shopsight(
        settings, "models", "promote", "shopsight-churn", "--online", "--day", LAST.isoformat(), *events
    )
    assert churn.returncode == 1 and "needs a champion and a challenger" in churn.stderr, churn.stderr[-2000:]


# The dashboard's panels that this test's Prometheus has data for (no shadow, canary or fallback here)
PANELS_WITH_DATA = (
    "Requests by team", "Latency by team (p50, p99)", "Version served by alias", "Answers by version",
    "Online metrics by version", "Answers by outcome", "Monitor", "Online metric over time, by version",
    "Drift: PSI, worst first", "Drift: KS statistic", "Training-serving skew",
)  # fmt: skip


def _check_the_dashboard_queries(prometheus_port: int) -> None:
    """Every query of the Grafana dashboard (infra/k8s/monitoring) as Grafana sends it, with its variables
    set: Prometheus accepts each, and the panels this test has data for show some."""
    import requests

    dashboard = json.loads((ROOT / "infra/k8s/monitoring/dashboards/shopsight.json").read_text())
    values = {"$endpoint": "/v1/.*", "$task": "churn", "$__rate_interval": "1m"}
    api = f"http://127.0.0.1:{prometheus_port}/api/v1/query"
    deadline = time.time() + 20  # rate() needs two scrapes of a series (one a second here)
    while True:
        empty = []
        for panel in (p for p in dashboard["panels"] if p["type"] != "row"):
            for target in panel["targets"]:
                expression = target["expr"]
                for name, value in values.items():
                    expression = expression.replace(name, value)
                answer = requests.get(api, params={"query": expression}, timeout=10).json()
                assert answer["status"] == "success", f"{panel['title']}: {expression}: {answer}"
                if panel["title"] in PANELS_WITH_DATA and not answer["data"]["result"]:
                    empty.append(f"{panel['title']}: {expression}")
        if not empty or time.time() > deadline:
            break
        time.sleep(1)
    assert not empty, empty


def test_prometheus_scrapes_the_serving_metrics_and_the_monitors_gauges(world, free_port, tmp_path):
    """A real Prometheus (Debian's package) scrapes the serving API's /metrics with a team's key: the
    requests counted by team, and the monitor's last gauges, which the same endpoint appends."""
    import threading
    import time

    import requests
    import uvicorn

    from shopsight.platform.api_keys import hash_key
    from shopsight.serving.app import build_app, monitor_metrics_file

    binary = installed("prometheus", package="prometheus")
    settings, key = world["settings"], "team-a-key"
    if not monitor_metrics_file(settings.data_dir).exists():  # this test alone: the monitor's gauges first
        run(settings, events=world["events"], tasks=["churn"], track=False)
    predictors = _predictors(settings, _end_of(LAST), {"purchase": None})
    app = build_app(LocalBackend(predictors), {"team_a": hash_key(key)},
                    monitor_metrics=monitor_metrics_file(settings.data_dir))  # fmt: skip
    port, prometheus_port = free_port(), free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: shopsight-serving\n"
        f"    authorization: {{credentials: {key}}}\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline, "the serving app did not start"
            time.sleep(0.1)
        for first in range(1, 6):
            url = f"http://127.0.0.1:{port}/v1/purchase-propensity"
            answer = requests.post(url, json={"user_ids": [first]}, headers={"X-API-Key": key}, timeout=30)
            assert answer.status_code == 200, answer.text

        def query(expression: str) -> list:
            api = f"http://127.0.0.1:{prometheus_port}/api/v1/query"
            try:
                return requests.get(api, params={"query": expression}, timeout=5).json()["data"]["result"]
            except (requests.RequestException, KeyError, ValueError):
                return []

        answered = (
            'sum(shopsight_requests_total{endpoint="/v1/purchase-propensity",team="team_a",status="200"})'
        )
        deadline = time.time() + 60
        while not query(answered) or float(query(answered)[0]["value"][1]) < 5:
            assert prometheus.poll() is None, "prometheus exited"
            assert time.time() < deadline, f"prometheus did not scrape the 5 answers: {query(answered)}"
            time.sleep(0.5)
        assert float(query(answered)[0]["value"][1]) == 5
        (up,) = query('up{job="shopsight-serving"}')
        assert up["value"][1] == "1"
        (skew,) = query(f'shopsight_feature_skew{{task="churn",feature="{BROKEN}"}}')
        assert float(skew["value"][1]) > 0.5
        assert query('shopsight_online_metric{task="churn",alias="champion",metric="roc_auc",bound="value"}')
        _check_the_dashboard_queries(prometheus_port)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        server.should_exit = True


def test_the_monitor_runs_as_a_job_and_an_alert_submits_the_retrain(world, free_port):
    """On the Ray head of `shopsight cluster up`: `jobs submit monitor --follow` runs the monitor as a Ray
    job, whose log has the alert lines and whose failure (the command's exit 3) is the submitter's; and
    `monitor --on-alert retrain` submits a `train` job with the champion's model family and training data,
    as its registered version records them, which the cluster runs."""
    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import tracking_uri
    from shopsight.training.tasks import get_task

    settings, events, day = world["settings"], str(world["events"]), LAST.isoformat()
    head = ["--set", f"ray.head_port={free_port()}", "--set", f"ray.dashboard_port={free_port()}",
            "--set", "ray.num_cpus=2"]  # fmt: skip
    up = _shopsight(settings, *head, "cluster", "up")
    assert up.returncode == 0, up.stderr[-2000:]
    try:
        job = _shopsight(settings, *head, "jobs", "submit", "monitor", "--follow", "--", "--day", day,
                         "--data", events, "--task", "churn", "--no-track")  # fmt: skip
        assert job.returncode == 1, job.stderr[-2000:]  # the job failed: the monitor found alerts
        logged = job.stdout + job.stderr
        assert f"alert: churn: feature {BROKEN} is served unlike the offline store" in logged, logged[-3000:]

        # the champion as `shopsight train` registers one: its version names the model family and data
        client = MlflowClient(tracking_uri(settings))
        churn = get_task("churn").registered_model
        champion = client.get_model_version_by_alias(churn, "champion").version
        client.set_model_version_tag(churn, champion, "model", "sasrec")
        client.set_model_version_tag(churn, champion, "dataset.path", events)
        alerted = _shopsight(settings, *head, "monitor", "--day", day, "--data", events, "--task", "churn",
                             "--no-track", "--on-alert", "retrain")  # fmt: skip
        assert alerted.returncode == 3, alerted.stderr[-2000:]
        (job_id,) = re.findall(r"churn: retrain submitted as (\S+) ", alerted.stdout)
        entrypoint = re.search(r"\((python -m shopsight .*)\)", alerted.stdout).group(1)
        assert entrypoint.endswith(f"train --task churn --model sasrec --data {events}"), entrypoint
        deadline = time.time() + 180
        while True:
            status = _shopsight(settings, *head, "jobs", "status", job_id, "-o", "json")
            state = json.loads(status.stdout)["status"] if status.stdout.strip() else "?"
            if state in ("RUNNING", "SUCCEEDED"):
                break
            assert state in ("PENDING", "?") and time.time() < deadline, status.stdout + status.stderr[-2000:]
            time.sleep(2)
        _shopsight(settings, *head, "jobs", "stop", job_id)  # started is what this test asks: not its epochs
    finally:
        down = _shopsight(settings, *head, "cluster", "down")
        assert down.returncode == 0, down.stderr[-2000:]
