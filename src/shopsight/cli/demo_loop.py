"""The demo's last stage: the loop from served answers back to outcomes, once.

A second purchase model goes out as a canary beside the champion; every user is answered by every served
route (the answers describe the end of the last simulated day); the simulator goes on by one day; and the
monitor joins the logged answers with what followed.
"""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path

from shopsight.platform import ShopsightError, console, spinner


def close_the_loop(served, simulation: Path, day: date, *, users: int, purchase_epochs: int, log) -> dict:
    """Run the loop on the demo's deployment (``served``: a ``DemoServing``); returns summary rows."""
    import requests

    from shopsight.data import continue_simulation
    from shopsight.monitoring.monitor import day_window, run
    from shopsight.serving.deploy import deploy
    from shopsight.training.tasks import get_task, served_tasks

    settings = served.settings
    purchase = get_task("purchase")
    canary = _train_canary(settings, purchase, simulation, purchase_epochs, log)
    deploy(settings, log_level="WARNING", canary_share=0.5)  # user_config: the running replicas take it
    headers = {"X-API-Key": served.key}
    _wait_for_challenger(served.url, headers, "purchase", canary)
    answered: set[str] = set()
    with spinner(f"answering every user on every route, as of the end of {day}"), requests.Session() as http:
        for task in served_tasks():
            path = served.url + task.route.path
            if task.route.predictor == "ranking":
                bodies = [{"user_id": user, "k": 10} for user in range(1, min(users, 500) + 1)]
            else:
                step = settings.serving.max_user_ids
                bodies = [
                    {"user_ids": list(range(u, min(u + step, users + 1)))} for u in range(1, users + 1, step)
                ]
            for body in bodies:
                answer = http.post(path, json=body, headers=headers, timeout=60)
                answer.raise_for_status()
                answered.add(answer.headers["x-request-id"])
    with spinner("simulating the next day: what followed the answers"):
        continued = continue_simulation(simulation, 1)
    console.print(
        f"{len(answered):,} requests answered and logged; the day after {day} simulated: "
        f"{continued.events:,} events in all"
    )
    _wait_for_the_log(settings, answered)
    start, end = day_window(day.isoformat(), settings.data.timezone)
    with spinner("monitoring: outcomes, online metrics, drift, skew"):
        report = run(settings, events=simulation, start=start, end=end)
    for task in report.tasks:
        if not task.versions:
            console.print(f"{task.task}: {'; '.join(task.notes)}")
        for version in task.versions:
            metric = version.metrics.get(task.primary)
            shown = f"{metric.value:.3f} [{metric.lo:.3f}, {metric.hi:.3f}]" if metric else "-"
            pending = f", {version.pending:,} pending" if version.pending else ""
            console.print(
                f"{task.task} v{version.version} {version.alias}: online {task.primary} {shown} "
                f"({version.labelled:,} answers labelled{pending})"
            )
        for c in task.comparisons:
            console.print(
                f"{task.task} {c.alias} - champion: {c.difference.value:+.3f} "
                f"[{c.difference.lo:+.3f}, {c.difference.hi:+.3f}]"
            )
        if task.drift:
            worst = ", ".join(f"{d.feature} {d.psi:.2f}" for d in task.drift[:3])
            console.print(f"{task.task}: most drifted features (PSI): {worst}")
    return {
        "monitoring run": report.run_url or report.run_id or "-",
        "monitor report": str(report.html_path) if report.html_path else "-",
        "alerts": f"{len(report.alerts)} (`shopsight monitor --day {day} --data {simulation}` lists them)",
    }


def _train_canary(settings, task, simulation: Path, epochs: int, log) -> str:
    """A second model of ``task``, the other family than its default, registered as the challenger."""
    from shopsight.training.binary.train import train_snapshot_model
    from shopsight.training.runtime.loop import LoopConfig

    family = next(model for model in task.models if model != task.default_model)
    training_set = Path(settings.data_dir) / "demo" / f"training_set_{task.name}.parquet"
    with spinner(f"training a {family} {task.name} model for the canary"):
        summary = train_snapshot_model(
            settings, task, family, training_set,
            model_config={"d_model": 32, "dropout": 0.2} | ({"n_heads": 2} if family == "sasrec" else {}),
            loop=LoopConfig(epochs=epochs, batch_size=256, eval_every=1, patience=2, weight_decay=1e-5),
            truth=simulation / "truth" / task.code.ORACLE_FILE, log=log,
        )  # fmt: skip
    console.print(
        f"{summary.registered_model} v{summary.version} ({family}, challenger): test ROC-AUC "
        f"{summary.test['roc_auc']:.3f}; served as a canary to half the propensity requests"
    )
    return str(summary.version)


def _wait_for_challenger(url: str, headers: dict, task: str, version: str, timeout_s: float = 120) -> None:
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        served = requests.get(f"{url}/v1/models", headers=headers, timeout=10).json().get(task, {})
        if (served.get("challenger") or {}).get("version") == version:
            return
        time.sleep(1)
    raise ShopsightError(
        f"the {task} replicas did not load the challenger version {version} in {timeout_s:g} s"
    )


def _wait_for_the_log(settings, answered: set[str], timeout_s: float = 60) -> None:
    """Until the replicas have rolled the answers into the prediction log (every 2 s in the demo)."""
    from shopsight.serving.prediction_log import prediction_log_destination, read_predictions

    destination, filesystem = prediction_log_destination(settings)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        logged = read_predictions(destination, filesystem=filesystem).column("request_id").to_pylist()
        if answered <= set(logged):
            return
        time.sleep(1)
    raise ShopsightError(
        f"the prediction log did not receive the {len(answered):,} answers in {timeout_s:g} s"
    )
