"""``shopsight monitor``: how the served models do on what followed their answers.

For a window of answers (by the time their features describe, ``as_of``), for every served task that
declares a :class:`~shopsight.training.tasks.FollowUp`:

1. the prediction log's answers, unique by request, user and alias, labelled by the events after them
   (:mod:`~shopsight.monitoring.outcomes`);
2. per model version and alias (champion, canary, shadow): the task's online metrics with bootstrap
   intervals (ranking: NDCG@k and HR@k of the served top k; probability: ROC-AUC, ECE, Brier score), and
   a challenger against the champion on the primary metric with a paired (shadow) or two-group (canary)
   interval (:mod:`~shopsight.monitoring.stats`);
3. drift of the served feature values from the champion's training set: PSI and KS per feature;
4. skew: the served values of a sample of answers against the offline store's for the same user and time
   (:mod:`~shopsight.monitoring.skew`);
5. on simulated data (a ``truth/`` folder beside the events), the ROC-AUC that the oracle's true
   probabilities say the served probabilities should reach on the same answers.

Thresholds (``monitoring.*``) turn into alerts. The results go to one MLflow run per window (metrics,
plots, ``report.json``, ``report.html``), to Prometheus gauges in ``<data_dir>/monitor/monitor.prom``
(node_exporter's textfile format; the serving API's ``/metrics`` appends them), and to the caller.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from shopsight.lifecycle.promotion import OnlineEvidence
from shopsight.monitoring import outcomes, skew, stats
from shopsight.platform import Settings, ShopsightError
from shopsight.serving.app import monitor_metrics_file
from shopsight.serving.prediction_log import prediction_log_destination, read_predictions
from shopsight.serving.predictor import CHAMPION
from shopsight.training.tasks import Task, served_tasks

log = logging.getLogger("shopsight.monitoring")

MAX_REFERENCE_ROWS = 50_000


@dataclass
class VersionReport:
    model: str
    version: str
    alias: str
    answers: int
    labelled: int
    pending: int
    unseen: int
    metrics: dict[str, stats.Estimate] = field(default_factory=dict)
    oracle: dict[str, float] = field(default_factory=dict)  # metric -> what the true probabilities give

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "alias": self.alias,
            "answers": self.answers,
            "labelled": self.labelled,
            "pending": self.pending,
            "unseen": self.unseen,
            "metrics": {name: e.as_dict() for name, e in self.metrics.items()},
            "oracle": self.oracle,
        }


@dataclass
class TaskReport:
    task: str
    kind: str
    primary: str
    versions: list[VersionReport] = field(default_factory=list)
    comparisons: list[stats.Comparison] = field(default_factory=list)
    drift: list[stats.FeatureDrift] = field(default_factory=list)
    skew: list[skew.FeatureSkew] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    daily: pd.DataFrame | None = None  # day, version, alias, primary metric
    calibration: dict[str, tuple] = field(default_factory=dict)  # version/alias -> predicted, observed

    def as_dict(self) -> dict:
        return {
            "task": self.task,
            "kind": self.kind,
            "primary": self.primary,
            "versions": [v.as_dict() for v in self.versions],
            "comparisons": [c.as_dict() for c in self.comparisons],
            "drift": [d.as_dict() for d in self.drift],
            "skew": [s.as_dict() for s in self.skew],
            "notes": self.notes,
        }


@dataclass
class MonitorReport:
    start: datetime | None
    end: datetime | None
    observed_until: datetime
    tasks: list[TaskReport]
    alerts: list[str] = field(default_factory=list)
    run_id: str | None = None
    run_url: str | None = None
    html_path: Path | None = None

    def as_dict(self) -> dict:
        return {
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "observed_until": self.observed_until.isoformat(),
            "tasks": [t.as_dict() for t in self.tasks],
            "alerts": self.alerts,
            "run_id": self.run_id,
            "report": str(self.html_path) if self.html_path else None,
        }


def monitored_tasks(names: list[str] | None = None) -> list[Task]:
    """The served tasks that say how their answers are followed up (all, or those named)."""
    tasks = [task for task in served_tasks() if task.follow_up is not None]
    if names:
        known = {task.name: task for task in tasks}
        unknown = [n for n in names if n.replace("-", "_") not in known]
        if unknown:
            raise ShopsightError(
                f"not a monitored task: {', '.join(unknown)} (monitored: {', '.join(known) or 'none'})"
            )
        tasks = [known[n.replace("-", "_")] for n in names]
    return tasks


def run(
    settings: Settings,
    *,
    events: Path,
    start: datetime | None = None,
    end: datetime | None = None,
    tasks: list[str] | None = None,
    observed_until: datetime | None = None,
    track: bool = True,
    features: bool = True,
    say: Callable[[str], None] = lambda _: None,
) -> MonitorReport:
    """Monitor the answers whose ``as_of`` is in ``[start, end)`` (all when unbounded). ``features``:
    also drift and skew (and the Prometheus file); without, only the outcomes and metrics."""
    destination, filesystem = prediction_log_destination(settings)
    until = observed_until or outcomes.observed_end(events, settings.data.timezone)
    reports = []
    for task in monitored_tasks(tasks):
        say(f"{task.name}: reading the prediction log ...")
        logged = read_predictions(destination, tasks=[task.name], filesystem=filesystem).to_pandas()
        if start is not None or end is not None:
            as_of = pd.to_datetime(logged["as_of"], utc=True)
            keep = np.ones(len(logged), dtype=bool)
            if start is not None:
                keep &= (as_of >= pd.Timestamp(start)).to_numpy()
            if end is not None:
                keep &= (as_of < pd.Timestamp(end)).to_numpy()
            logged = logged[keep]
        reports.append(_task_report(settings, task, logged, events, until, features, say))
    report = MonitorReport(start, end, until, reports)
    report.alerts = alerts(report, settings)
    if features:
        _write_prometheus(settings, report)
    if track:
        say("recording the monitoring run in MLflow ...")
        _track(settings, report, events)
    return report


def _task_report(settings, task: Task, logged, events, until, features: bool, say) -> TaskReport:
    cfg = settings.monitoring
    kind = task.route.predictor
    k = cfg.k
    primary = stats.metric_names(kind, k)[0]
    report = TaskReport(task.name, kind, primary)
    if logged.empty:
        report.notes.append("no answers logged in the window")
        return report
    answers = outcomes.unique_answers(logged)
    duplicates = len(logged) - len(answers)
    if duplicates:
        report.notes.append(f"{duplicates} duplicated records (retried requests) counted once")
    first, last = outcomes.window_bounds(answers, task.follow_up)
    say(f"{task.name}: {len(answers):,} answers; reading the events that follow them ...")
    seen = outcomes.read_events(events, first, last, answers["user_id"].unique())
    labelled = outcomes.label(answers, seen, task.follow_up, until)
    truth = _truth(events, task, labelled, settings)
    samples, seed = settings.promotion.bootstrap_samples, settings.promotion.seed
    groups = labelled.groupby(["model", "version", "alias"], sort=True)
    by_alias: dict[str, pd.DataFrame] = {}
    for (model, version, alias), group in groups:
        done = group[group["status"] == outcomes.LABELLED].reset_index(drop=True)
        version_report = VersionReport(
            model, str(version), alias, len(group), len(done),
            int((group["status"] == outcomes.PENDING).sum()), int((group["status"] == outcomes.UNSEEN).sum()),
        )  # fmt: skip
        if len(done):
            columns = stats.per_answer_columns(kind, done, k)
            for name in stats.metric_names(kind, k):
                function = stats.metric_function(kind, name, columns)
                version_report.metrics[name] = stats.estimate(function, len(done), samples, seed)
            if truth is not None:
                oracle_p = _oracle_for(truth, done)
                if oracle_p is not None:
                    version_report.oracle["roc_auc"] = expected_roc_auc(columns["p"], oracle_p)
            if kind == "probability":
                from shopsight.training.runtime.metrics import decile_calibration

                predicted, observed, _ = decile_calibration(columns["y"], columns["p"])
                report.calibration[f"v{version} {alias}"] = (predicted, observed)
        report.versions.append(version_report)
        by_alias.setdefault(alias, done)
    champion = by_alias.get(CHAMPION)
    for alias, done in by_alias.items():
        if alias == CHAMPION or champion is None or champion.empty or done.empty:
            continue
        report.comparisons.append(stats.compare(kind, primary, champion, done, alias, k, samples, seed))
    report.daily = _daily(labelled, kind, primary, k)
    if not features:
        return report
    say(f"{task.name}: drift of the served features ...")
    _drift(settings, task, answers, report)
    if cfg.skew_sample > 0:
        say(f"{task.name}: skew: {min(cfg.skew_sample, len(answers))} answers recomputed offline ...")
        _skew(settings, task, answers, report)
    return report


def _daily(labelled: pd.DataFrame, kind: str, primary: str, k: int) -> pd.DataFrame:
    done = labelled[labelled["status"] == outcomes.LABELLED]
    rows = []
    days = pd.to_datetime(done["as_of"], utc=True).dt.strftime("%Y-%m-%d %H:%M")
    for (day, version, alias), group in done.groupby([days, "version", "alias"]):
        group = group.reset_index(drop=True)
        function = stats.metric_function(kind, primary, stats.per_answer_columns(kind, group, k))
        rows.append(
            {"as_of": day, "version": version, "alias": alias, primary: function(np.arange(len(group)))}
        )
    return pd.DataFrame(rows)


def served_features(answers: pd.DataFrame) -> pd.DataFrame:
    """The champion's answers' feature values as a table (one row per answer)."""
    champion = answers[answers["alias"] == CHAMPION]
    return pd.DataFrame.from_records([json.loads(text) for text in champion["features"]])


def _drift(settings: Settings, task: Task, answers: pd.DataFrame, report: TaskReport) -> None:
    reference, why = training_reference(settings, task)
    if reference is None:
        report.notes.append(f"drift not measured: {why}")
        return
    served = served_features(answers)
    report.drift = stats.drift(reference, served, list(served.columns))


def training_reference(settings: Settings, task: Task) -> tuple[pd.DataFrame | None, str]:
    """The champion's training set (its run's ``dataset.path``), when it is a table of the features."""
    from shopsight.lifecycle.registry import alias_version, registry_client, version_info

    try:
        client = registry_client(settings)
        version = alias_version(client, task.registered_model, CHAMPION)
        if version is None:
            return None, f"{task.registered_model} has no champion"
        path = version_info(client, task.registered_model, version).dataset.get("dataset.path")
    except Exception as exc:  # noqa: BLE001 - the other checks still run
        return None, f"the registry could not be read ({type(exc).__name__})"
    if not path or not Path(path).exists():
        return None, f"the champion's training set is not readable here ({path or 'not recorded'})"
    if not str(path).endswith(".parquet"):
        return None, f"the champion's training data {path} is not a table of features"
    frame = pd.read_parquet(path)
    if len(frame) > MAX_REFERENCE_ROWS:
        frame = frame.sample(MAX_REFERENCE_ROWS, random_state=settings.promotion.seed)
    return frame, ""


def _skew(settings: Settings, task: Task, answers: pd.DataFrame, report: TaskReport) -> None:
    champion = answers[(answers["alias"] == CHAMPION) & ~answers["features_unavailable"]]
    if champion.empty:
        return
    sample = champion.sample(
        min(settings.monitoring.skew_sample, len(champion)), random_state=settings.promotion.seed
    )
    sample = sample.reset_index(drop=True)
    try:
        offline = skew.offline_values(settings, task.route.service, sample)
    except Exception as exc:  # noqa: BLE001 - the offline store may not hold the window: say so
        report.notes.append(
            f"skew not measured: the offline store could not be read ({type(exc).__name__}: {exc})"
        )
        return
    report.skew = skew.skew(sample, offline)


# ------------------------------------------------------------------------------------- oracle


def _truth(events: Path, task: Task, labelled: pd.DataFrame, settings: Settings) -> pd.DataFrame | None:
    """The simulator's true probabilities of the task's outcome (``truth/`` beside the events), keyed by
    user and snapshot day; None for real data."""
    if task.follow_up is None or not task.follow_up.truth:
        return None
    file, column = task.follow_up.truth
    folder = Path(events)
    folder = folder.parent if folder.name == "events" else folder
    path = folder / "truth" / file
    if not path.exists():
        return None
    truth = pd.read_parquet(path, columns=["user_id", "day", column]).rename(columns={column: "p_true"})
    return truth


def _oracle_for(truth: pd.DataFrame, done: pd.DataFrame) -> np.ndarray | None:
    """The true probability of each answer's outcome: the snapshot day is the shop-local day that ends at
    the answer's ``as_of``."""
    from shopsight.data.schema import SHOP_TIMEZONE

    local = pd.to_datetime(done["as_of"], utc=True).dt.tz_convert(SHOP_TIMEZONE) - pd.Timedelta(
        microseconds=1
    )
    keys = pd.DataFrame(
        {"user_id": done["user_id"].to_numpy(), "day": local.dt.strftime("%Y-%m-%d").to_numpy()}
    )
    joined = keys.merge(truth, on=["user_id", "day"], how="left")
    if joined["p_true"].isna().any():
        return None
    return joined["p_true"].to_numpy(dtype=float)


def expected_roc_auc(scores: np.ndarray, p_true: np.ndarray) -> float:
    """The ROC-AUC that ``scores`` reach in expectation when each outcome is drawn with its true
    probability: ``sum p_i (1 - p_j) [s_i > s_j]`` over pairs (ties half) over ``sum p_i (1 - p_j)``, the
    probability that a random positive outranks a random negative (pairs weighted as they would occur)."""
    order = np.argsort(scores, kind="stable")
    s, p = np.asarray(scores, dtype=float)[order], np.asarray(p_true, dtype=float)[order]
    q = 1.0 - p
    _, starts, counts = np.unique(s, return_index=True, return_counts=True)
    below = np.concatenate([[0.0], np.cumsum(q)])  # sum of q over rows before each position
    numerator = 0.0
    for first, n in zip(starts, counts, strict=True):
        tie_p, tie_q = p[first : first + n], q[first : first + n]
        numerator += tie_p.sum() * below[first]  # negatives with a lower score
        numerator += 0.5 * (tie_p.sum() * tie_q.sum() - float(np.dot(tie_p, tie_q)))  # ties, not itself
    denominator = p.sum() * q.sum() - float(np.dot(p, q))
    return float(numerator / denominator) if denominator > 0 else float("nan")


# ------------------------------------------------------------------------------------- alerts


def alerts(report: MonitorReport, settings: Settings) -> list[str]:
    """One line per breached threshold."""
    cfg, tolerance = settings.monitoring, settings.promotion.tolerance
    lines = []
    for task in report.tasks:
        for v in task.versions:
            for name, e in v.metrics.items():
                low, high = cfg.min_metrics.get(name), cfg.max_metrics.get(name)
                if low is not None and e.value < low:
                    lines.append(f"{task.task}: {v.alias} v{v.version} {name} {e.value:.4f} is below {low:g}")
                if high is not None and e.value > high:
                    lines.append(
                        f"{task.task}: {v.alias} v{v.version} {name} {e.value:.4f} is above {high:g}"
                    )
        for c in task.comparisons:
            worse = -c.difference.value if task.primary not in stats.LOWER_IS_BETTER else c.difference.value
            if worse > tolerance and c.difference.hi < 0:
                lines.append(
                    f"{task.task}: {c.alias} v{c.version} is worse than the champion "
                    f"v{c.champion_version} on {c.metric} by {worse:.4f} (95% CI [{c.difference.lo:+.4f}, "
                    f"{c.difference.hi:+.4f}], tolerance {tolerance:g})"
                )
        for d in task.drift:
            if d.psi > cfg.max_psi:
                lines.append(
                    f"{task.task}: feature {d.feature} drifted: PSI {d.psi:.3f} > {cfg.max_psi:g} "
                    f"(KS {d.ks:.3f})"
                )
        for s in task.skew:
            if s.mismatch_rate > cfg.max_skew:
                lines.append(
                    f"{task.task}: feature {s.feature} is served unlike the offline store for "
                    f"{s.mismatch_rate:.1%} of {s.compared} answers (> {cfg.max_skew:.1%})"
                )
    return lines


# ----------------------------------------------------------------------------------- outputs


_FEATURE = ("task", "feature")
# The monitor's Prometheus gauges (name: help, labels), which the serving API's /metrics appends
GAUGES = {
    "shopsight_online_metric": (
        "Online metric of a served version over the last monitored window.",
        ("task", "model", "version", "alias", "metric", "bound"),
    ),
    "shopsight_monitored_answers": (
        "Answers of the last monitored window, by their outcome's state.",
        ("task", "version", "alias", "state"),
    ),
    "shopsight_feature_psi": ("PSI of a served feature against the training set.", _FEATURE),
    "shopsight_feature_ks": ("KS statistic of a served feature against the training set.", _FEATURE),
    "shopsight_feature_skew": ("Share of sampled answers whose feature differs offline.", _FEATURE),
    "shopsight_monitor_alerts": ("Alerts of the last monitoring run.", ()),
    "shopsight_monitor_last_run_timestamp_seconds": ("When the monitor last ran.", ()),
}


def _write_prometheus(settings: Settings, report: MonitorReport) -> Path:
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    metric, answers, psi, ks, skewed, alerts_gauge, last = (
        Gauge(name, documentation, list(labels), registry=registry)
        for name, (documentation, labels) in GAUGES.items()
    )
    for task in report.tasks:
        for v in task.versions:
            for state, n in (("labelled", v.labelled), ("pending", v.pending), ("unseen", v.unseen)):
                answers.labels(task.task, v.version, v.alias, state).set(n)
            for name, e in v.metrics.items():
                for bound, value in (("value", e.value), ("lo", e.lo), ("hi", e.hi)):
                    if math.isfinite(value):
                        metric.labels(task.task, v.model, v.version, v.alias, name, bound).set(value)
        for d in task.drift:
            psi.labels(task.task, d.feature).set(d.psi)
            ks.labels(task.task, d.feature).set(d.ks)
        for s in task.skew:
            skewed.labels(task.task, s.feature).set(s.mismatch_rate)
    alerts_gauge.set(len(report.alerts))
    last.set_to_current_time()
    path = monitor_metrics_file(settings.data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)  # written to a temporary file and renamed by the library
    return path


def monitor_dir(settings: Settings) -> Path:
    return Path(settings.data_dir).absolute() / "monitor"


def _track(settings: Settings, report: MonitorReport, events: Path) -> None:
    import mlflow

    from shopsight.lifecycle.registry import registry_client

    client = registry_client(settings)
    experiment = client.get_experiment_by_name(settings.monitoring.experiment)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(settings.monitoring.experiment)
    )
    window = f"{_short(report.start)}..{_short(report.end)}"
    run = client.create_run(experiment_id, run_name=f"monitor {window}", tags={"shopsight.kind": "monitor"})
    run_id = run.info.run_id
    report.run_id = run_id
    metrics, params = {}, {
        "window_start": _short(report.start), "window_end": _short(report.end),
        "observed_until": report.observed_until.isoformat(), "events": str(events),
    }  # fmt: skip
    for task in report.tasks:
        for v in task.versions:
            for name, e in v.metrics.items():
                base = f"{task.task}.{v.alias}.v{v.version}.{_metric_key(name)}"
                metrics.update({base: e.value, f"{base}_lo": e.lo, f"{base}_hi": e.hi})
            for name, value in v.oracle.items():
                metrics[f"{task.task}.{v.alias}.v{v.version}.oracle_{_metric_key(name)}"] = value
            metrics[f"{task.task}.{v.alias}.v{v.version}.labelled"] = v.labelled
        for c in task.comparisons:
            base = f"{task.task}.{c.alias}_vs_champion.{_metric_key(c.metric)}"
            metrics.update(
                {base: c.difference.value, f"{base}_lo": c.difference.lo, f"{base}_hi": c.difference.hi}
            )
        for d in task.drift:
            metrics[f"{task.task}.psi.{d.feature}"] = d.psi
            metrics[f"{task.task}.ks.{d.feature}"] = d.ks
        for s in task.skew:
            metrics[f"{task.task}.skew.{s.feature}"] = s.mismatch_rate
    metrics["alerts"] = len(report.alerts)
    from mlflow.entities import Metric, Param

    at = int(datetime.now(UTC).timestamp() * 1000)
    finite = [
        Metric(k, float(v), at, 0) for k, v in metrics.items() if v is not None and math.isfinite(float(v))
    ]
    for chunk in range(0, len(finite), 900):
        client.log_batch(run_id, metrics=finite[chunk : chunk + 900])
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    figures = _figures(report)
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"plots/{name}.png")
    client.log_dict(run_id, report.as_dict(), "report.json")
    folder = monitor_dir(settings) / f"{run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    report.html_path = write_html(report, figures, folder / "report.html")
    client.log_artifact(run_id, str(report.html_path))
    client.set_terminated(run_id, "FINISHED")
    _close(figures)
    uri = mlflow.get_tracking_uri()
    report.run_url = (
        f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if uri.startswith("http") else None
    )


def _metric_key(name: str) -> str:
    return name.replace("@", "_at_")


def _short(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M") if moment else "*"


def _figures(report: MonitorReport) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    for task in report.tasks:
        if task.daily is not None and not task.daily.empty:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            for (version, alias), group in task.daily.groupby(["version", "alias"]):
                ax.plot(group["as_of"], group[task.primary], marker="o", label=f"v{version} {alias}")
            ax.set_title(f"{task.task}: online {task.primary} by version")
            ax.set_xlabel("answers as of")
            ax.legend()
            fig.autofmt_xdate()
            fig.tight_layout()
            figures[f"{task.task}-{_metric_key(task.primary)}-over-time"] = fig
        if task.calibration:
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
            for name, (predicted, observed) in task.calibration.items():
                ax.plot(predicted, observed, marker="o", label=name)
            ax.set_title(f"{task.task}: reliability")
            ax.set_xlabel("mean predicted probability")
            ax.set_ylabel("observed rate")
            ax.legend()
            fig.tight_layout()
            figures[f"{task.task}-reliability"] = fig
        if task.drift:
            worst = task.drift[:15][::-1]
            fig, ax = plt.subplots(figsize=(7, 0.3 * len(worst) + 1.2))
            ax.barh([d.feature for d in worst], [d.psi for d in worst])
            ax.axvline(0.25, color="red", linestyle="--", label="shift (0.25)")
            ax.set_title(f"{task.task}: drift of served features (PSI)")
            ax.legend()
            fig.tight_layout()
            figures[f"{task.task}-drift"] = fig
    return figures


def _close(figures: dict) -> None:
    import matplotlib.pyplot as plt

    for figure in figures.values():
        plt.close(figure)


def write_html(report: MonitorReport, figures: dict, path: Path) -> Path:
    """A page a person reads: the alerts, per task the versions' metrics, the comparisons, the worst
    drifted and skewed features, and the plots."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Shopsight monitor</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
        "margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}.alert{color:#b00020}td:first-child,th:first-child{text-align:left}</style>",
        "</head><body>",
        f"<h1>Shopsight monitor: answers as of {e(_short(report.start))} .. {e(_short(report.end))}</h1>",
        f"<p>Outcomes observed until {e(report.observed_until.isoformat())}.</p>",
    ]
    if report.alerts:
        parts.append("<h2 class='alert'>Alerts</h2><ul>")
        parts += [f"<li class='alert'>{e(line)}</li>" for line in report.alerts]
        parts.append("</ul>")
    else:
        parts.append("<h2>No alerts</h2>")
    for task in report.tasks:
        parts.append(f"<h2>{e(task.task)}</h2>")
        parts += [f"<p><em>{e(note)}</em></p>" for note in task.notes]
        names = stats.metric_names(task.kind, 10) if task.kind == "probability" else sorted(
            {n for v in task.versions for n in v.metrics}
        )  # fmt: skip
        header = "".join(f"<th>{e(n)} (95% CI)</th>" for n in names)
        parts.append(
            f"<table><tr><th>version</th><th>alias</th><th>answers</th><th>labelled</th><th>pending</th>"
            f"<th>unseen</th>{header}<th>oracle ROC-AUC</th></tr>"
        )
        for v in task.versions:
            cells = "".join(
                f"<td>{v.metrics[n].value:.4f} [{v.metrics[n].lo:.4f}, {v.metrics[n].hi:.4f}]</td>"
                if n in v.metrics else "<td>-</td>"
                for n in names
            )  # fmt: skip
            oracle = f"{v.oracle['roc_auc']:.4f}" if "roc_auc" in v.oracle else "-"
            parts.append(
                f"<tr><td>v{e(v.version)}</td><td>{e(v.alias)}</td><td>{v.answers}</td><td>{v.labelled}</td>"
                f"<td>{v.pending}</td><td>{v.unseen}</td>{cells}<td>{oracle}</td></tr>"
            )
        parts.append("</table>")
        for c in task.comparisons:
            kind = "paired" if c.paired else "two groups"
            parts.append(
                f"<p>{e(c.alias)} v{e(c.version)} - champion v{e(c.champion_version)} on {e(c.metric)}: "
                f"{c.difference.value:+.4f} (95% CI [{c.difference.lo:+.4f}, {c.difference.hi:+.4f}], "
                f"{kind}, {c.units} answers)</p>"
            )
        if task.drift:
            parts.append("<table><tr><th>feature</th><th>PSI</th><th>KS</th><th>KS p-value</th></tr>")
            parts += [
                f"<tr><td>{e(d.feature)}</td><td>{d.psi:.3f}</td><td>{d.ks:.3f}</td><td>{d.ks_p_value:.2g}</td></tr>"
                for d in task.drift[:10]
            ]
            parts.append("</table>")
        if task.skew:
            parts.append("<table><tr><th>feature</th><th>served unlike offline</th><th>answers</th></tr>")
            parts += [
                f"<tr><td>{e(s.feature)}</td><td>{s.mismatch_rate:.1%}</td><td>{s.compared}</td></tr>"
                for s in task.skew[:10]
            ]
            parts.append("</table>")
        for name, figure in figures.items():
            if name.startswith(task.task + "-"):
                buffer = io.BytesIO()
                figure.savefig(buffer, format="png", dpi=90)
                data = base64.b64encode(buffer.getvalue()).decode()
                parts.append(f"<p><img alt='{e(name)}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path


def end_of_day(day: str, timezone: str) -> datetime:
    """The first instant after a shop-local day, in UTC: what a replay of the day serves as of."""
    from zoneinfo import ZoneInfo

    start = datetime.fromisoformat(day).replace(tzinfo=ZoneInfo(timezone))
    return (start + timedelta(days=1)).astimezone(UTC)


def day_window(day: str, timezone: str) -> tuple[datetime, datetime]:
    """The window of the answers made on a shop-local day, by the time their features describe:
    ``(start of day, end of day]`` (a replay of the day serves them as of its end), as ``[start, end)``."""
    end = end_of_day(day, timezone)
    tick = timedelta(microseconds=1)
    return end - timedelta(days=1) + tick, end + tick


def online_evidence(
    settings: Settings,
    name: str,
    *,
    events: Path,
    start: datetime | None,
    end: datetime | None,
    say: Callable[[str], None] = lambda _: None,
) -> OnlineEvidence:
    """The challenger of registered model ``name`` against its champion on the window's served answers,
    for :func:`~shopsight.lifecycle.promotion.promote_online`."""
    from shopsight.lifecycle.registry import alias_version, registry_client
    from shopsight.training.tasks import task_of_model

    task = task_of_model(name)
    client = registry_client(settings)
    candidate = alias_version(client, name, "challenger")
    champion = alias_version(client, name, CHAMPION)
    if candidate is None or champion is None:
        raise ShopsightError(f"{name} needs a champion and a challenger served beside it to compare online")
    report = run(settings, events=events, start=start, end=end, tasks=[task.name], track=False,
                 features=False, say=say)  # fmt: skip
    (task_report,) = report.tasks
    window = (
        f"answers as of {_short(start)}..{_short(end)}, outcomes from {events} observed until "
        f"{report.observed_until.isoformat()}"
    )
    ours = [v for v in task_report.versions if v.version == champion and v.alias == CHAMPION]
    theirs = [c for c in task_report.comparisons if c.version == candidate]
    theirs.sort(key=lambda c: not c.paired)  # a shadow's paired comparison before a canary's
    metrics = lambda version: {n: e.value for n, e in version.metrics.items()}  # noqa: E731
    candidate_metrics = {}
    for v in task_report.versions:
        if v.version == candidate and v.alias != CHAMPION and v.metrics:
            candidate_metrics = metrics(v)
            break
    why = ""
    if not ours or not ours[0].metrics:
        why = f"the champion (version {champion}) has no labelled answers in the window"
    elif not theirs:
        why = f"version {candidate} has no labelled answers (as canary or shadow) in the window"
    difference = None
    if theirs and not why:
        c = theirs[0]
        difference = {"mean": c.difference.value, "lo": c.difference.lo, "hi": c.difference.hi,
                      "units": float(c.units)}  # fmt: skip
    return OnlineEvidence(
        task=task.name, candidate=candidate, champion=champion, metric=task_report.primary,
        candidate_metrics=candidate_metrics, champion_metrics=metrics(ours[0]) if ours else {},
        difference=difference, window=window, why_not=why,
    )  # fmt: skip
