"""Sweep a model's hyperparameters, for any task: Ray Tune (Optuna search, ASHA) around Ray Train runs.

Tune only defines the search space (the network's shape and the optimizer, plus what the task's package
adds, e.g. the next-item loss); the task's package prepares the data once on the driver (its ``prepare``),
and every trial is one :func:`shopsight.training.runtime.ray_train.train_with_ray` run of the task's worker,
with the trial's model config. Under Ray Train V2 the Tune trial function is the driver of that run: it
builds and fits the ``TorchTrainer``, whose ``TuneReportCallback`` forwards each epoch's report (metrics and
the checkpoint's path) to Tune while the run goes on, so ASHA can stop a weak trial after any epoch.
Resources: a trial's actor asks for 0.01 CPU (it only waits on its run), the Train controller for none, the
workers for their CPUs (and GPUs); as many trials run at once as the cluster holds all the workers of. A
stopped trial's workers are freed by :func:`release_orphaned_placement_groups` when Ray Train's own cleaner
cannot (no dashboard).

MLflow: one parent run for the sweep (kind ``tune``, the dataset's identity, the best parameters and
metrics, a table of all trials) and one child run per trial (``mlflow.parentRunId``) with the trial's
parameters, every epoch's metrics, and whether ASHA stopped it early. The driver logs the epochs, as Tune
receives them, so a child run's history is exactly what ASHA judged. The best trial (by the task's
validation metric) is evaluated by the task on its test protocol beside its baselines, and its model is
logged in its child run and registered as a new version with the alias ``challenger``, as ``shopsight
train`` does (:func:`~shopsight.training.runtime.tracking.register`).
"""

from __future__ import annotations

import csv
import io
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from shopsight.platform import Settings, ShopsightError, progress_bar
from shopsight.platform.mlflow_server import tracking_uri
from shopsight.platform.ray_cluster import storage_path
from shopsight.training.models import TUNABLE_MODELS  # the models with a search space
from shopsight.training.runtime.loop import LoopConfig
from shopsight.training.runtime.ray_train import CHECKPOINT_FILE
from shopsight.training.runtime.tracking import Prepared, log_dataset, mlflow_name, register
from shopsight.training.tasks import Task

# the search-space keys that configure the loop; every other key configures the model
LOOP_KEYS = frozenset({"lr", "batch_size", "weight_decay"})
# the per-epoch metrics of a trial that go into its MLflow run (besides every valid_* metric)
EPOCH_METRICS = ("loss", "samples_per_second", "epoch_seconds")
TRIAL_CPUS = 0.01  # the trial only drives its Train run (controller and workers hold the real resources)


def check_tunable(model: str) -> None:
    """ShopsightError unless ``model`` has a search space."""
    from shopsight.training.models import MODELS

    if model not in TUNABLE_MODELS:
        known = "unknown model" if model not in MODELS else "no search space for model"
        raise ShopsightError(f"{known} {model!r}: choose one of {', '.join(TUNABLE_MODELS)}")


def search_space(model: str, task: Task | None = None, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The default Tune search space of ``model`` (``sasrec`` or ``lstm``) and what ``task``'s package
    adds (its ``search_space(model, fixed)``, ``fixed`` the model config the data made: a next-item sweep
    tries history lengths around the one chosen); ShopsightError if the model has none.

    Widths up to 256 and dropout from 0.2 to 0.5 cover long, dense histories as well as short, sparse
    ones (the data-driven defaults pick from the same ranges, :mod:`shopsight.training.next_item.defaults`).
    """
    from ray import tune

    check_tunable(model)
    spaces = {
        "sasrec": lambda: {
            "d_model": tune.choice([32, 64, 128, 256]),
            "n_blocks": tune.choice([1, 2, 3]),
            "dropout": tune.uniform(0.2, 0.5),
            "lr": tune.loguniform(1e-4, 1e-2),
        },
        "lstm": lambda: {
            "d_model": tune.choice([32, 64, 128, 256]),
            "hidden": tune.choice([64, 128, 256, 512]),
            "dropout": tune.uniform(0.2, 0.5),
            "lr": tune.loguniform(1e-4, 1e-2),
        },
    }
    extra = getattr(task.code, "search_space", None) if task is not None else None
    return {**spaces[model](), **(extra(model, fixed or {}) if extra else {})}


@dataclass
class TrialRow:
    """One trial of a sweep, as the parent run's table shows it."""

    number: int
    trial_id: str
    run_id: str
    status: str  # completed | stopped early | failed
    epochs: int
    valid: float  # the best validation value of the task's metric over its epochs
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TuneSummary:
    parent_run_id: str
    run_url: str
    best_run_id: str
    best_params: dict[str, Any]
    best_valid: float  # of the task's metric
    registered_model: str
    version: str
    test: dict[str, float]
    baselines: dict[str, dict[str, float]]
    trials: list[TrialRow]
    seconds: float

    @property
    def stopped_early(self) -> int:
        return sum(row.status == "stopped early" for row in self.trials)


def _split_config(config: dict[str, Any], fixed: dict[str, Any]) -> tuple[dict[str, Any], LoopConfig]:
    """A trial's sampled values over the fixed ones: (model config, loop config)."""
    model_config = {**fixed["model_config"], **{k: v for k, v in config.items() if k not in LOOP_KEYS}}
    loop = LoopConfig(**{**fixed["loop"], **{k: v for k, v in config.items() if k in LOOP_KEYS}})
    return model_config, loop


def _trial(config: dict[str, Any], fixed: dict[str, Any]) -> None:
    """One Tune trial: the driver of one Ray Train run; each epoch reaches Tune as it is reported."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from shopsight.training.runtime.ray_train import train_with_ray

    model_config, loop = _split_config(config, fixed)
    trial_id = ray.tune.get_context().get_trial_id()
    result = train_with_ray(
        fixed["worker"],
        {**fixed["config"], "model_config": model_config},
        metric=fixed["metric"],
        name=trial_id,
        storage_path=fixed["storage_path"],
        workers=fixed["workers"],
        gpus_per_worker=fixed["gpus_per_worker"],
        worker_resources=fixed.get("worker_resources"),
        loop=loop,
        callbacks=[TuneReportCallback()],
        show_progress=False,
    )
    if result.error is not None:
        raise result.error


def _asha():
    """ASHA that also remembers which trials it stopped before their last epoch."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.stopped_early: set[str] = set()

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
                self.stopped_early.add(trial.trial_id)
            return decision

    return RecordingASHA


def release_orphaned_placement_groups(wait_s: float = 0.0) -> int:
    """Remove the worker placement groups of Ray Train runs whose controller died; returns how many.

    When ASHA stops a trial, Tune ends the trial's actor and with it the Train controller it owns, before
    the controller can remove its workers' placement group. Ray Train V2 leaves that to a detached
    cleaner that asks the State API whether the controller is dead, and the State API needs the Ray
    dashboard: without it (``ray.init(include_dashboard=False)``) the group is never removed and the next
    trial's Train run waits forever for the CPUs it holds. The GCS tables say the same without the
    dashboard: a group of this job, not detached, whose creator (a ``TrainController``) is dead.

    ``wait_s``: once the sweep is over every Train run's group is an orphan, but the last stopped trial's
    controller may still be dying; wait up to this long for it to die, so that its group goes too.
    """
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    deadline = time.monotonic() + wait_s
    removed = 0
    while True:
        dying = 0
        for group_id, creator_dead in _train_groups():
            if not creator_dead:
                dying += 1
                continue
            try:
                remove_placement_group(PlacementGroup(group_id))
                removed += 1
            except Exception:  # noqa: BLE001 - removed meanwhile (by Train's own cleaner): nothing to do
                pass
        if not dying or time.monotonic() >= deadline:
            return removed
        time.sleep(0.5)


def _train_groups() -> Iterator[tuple[Any, bool]]:
    """The placement groups of this job's Ray Train runs not yet removed: (id, whether the controller that
    created it is dead)."""
    import ray
    from ray._private import state as ray_state  # the GCS tables; the public State API needs the dashboard
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    job = ray.get_runtime_context().get_job_id()
    for raw in ray_state.state._connect_and_get_accessor().get_placement_group_table():
        group = table.FromString(raw)
        if group.state == table.REMOVED or group.is_detached or group.creator_job_id.hex() != job:
            continue
        creator = ray_state.actors(actor_id=group.creator_actor_id.hex()) or {}
        if creator.get("ActorClassName") == "TrainController":
            yield ray.PlacementGroupID(group.placement_group_id), group.creator_actor_dead


def _tracker(base):
    """A Tune callback (in the driver): a child run per trial, its epochs, one progress line per trial."""

    class Tracker(base):
        def __init__(
            self, uri, experiment_id, parent_run_id, run_name, tags, params, scheduler, trials, metric, log
        ):
            self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
            self.metric = metric  # the task's Metric: its validation value ranks the trials
            self.run_name, self.tags, self.params = run_name, tags, params
            self.scheduler, self.total, self.log = scheduler, trials, log
            self.rows: dict[str, TrialRow] = {}  # trial id -> its row (and MLflow run)
            self.finished = 0
            self.started: dict[str, float] = {}
            self.reap_until = 0.0  # after a trial ends, release what its Train run may have left behind
            self.last_reap = 0.0
            self._client = None
            self.epochs = 0  # each trial's most: a trial that ends counts as that many on the bar
            self.show: Callable[[int], None] | None = None  # the epochs done of all trials, to the bar

        def __getstate__(self):  # Tune pickles its run config: leave out the client, printer and bar
            return {**self.__dict__, "_client": None, "log": print, "show": None}

        def _advance(self) -> None:
            if self.show is not None:
                self.show(sum(r.epochs if r.status == "running" else self.epochs for r in self.rows.values()))

        @property
        def client(self):
            from mlflow import MlflowClient

            if self._client is None:
                self._client = MlflowClient(self.uri)
            return self._client

        def on_trial_start(self, iteration, trials, trial, **info):
            from mlflow.entities import Param

            number = len(self.rows) + 1
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{self.run_name}-trial-{number}",
                tags={
                    **self.tags,
                    "mlflow.parentRunId": self.parent_run_id,
                    "tune.trial_id": trial.trial_id,
                    "tune.trial_number": str(number),
                },
            )
            self.started[trial.trial_id] = time.monotonic()
            self.rows[trial.trial_id] = TrialRow(
                number, trial.trial_id, run.info.run_id, "running", 0, -1.0, dict(trial.config)
            )
            values = {**self.params, **_params_of(trial.config), "tune.trial_id": trial.trial_id}
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in values.items()])

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now < self.reap_until and now - self.last_reap >= 1.0:
                self.last_reap = now
                release_orphaned_placement_groups()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            from mlflow.entities import Metric

            if "epoch" not in result:
                return
            epoch, now = int(result["epoch"]), int(time.time() * 1000)
            keys = [k for k in result if k in EPOCH_METRICS or k.startswith("valid_")]
            metrics = [Metric(mlflow_name(k), float(result[k]), now, epoch) for k in keys]
            row = self.rows[trial.trial_id]
            self.client.log_batch(row.run_id, metrics=metrics)
            row.epochs = max(row.epochs, epoch)
            key = f"valid_{self.metric.key}"
            if key in result:
                row.valid = max(row.valid, float(result[key]))
            self._advance()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finish(trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finish(trial, failed=True)

        def _finish(self, trial, failed: bool) -> None:
            row = self.rows.get(trial.trial_id)
            if row is None or row.status != "running":
                return
            early = trial.trial_id in self.scheduler.stopped_early
            row.status = "failed" if failed else "stopped early" if early else "completed"
            self.finished += 1
            self.reap_until = time.monotonic() + 120
            seconds = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
            self.client.set_tag(row.run_id, "tune.early_stopped", str(early and not failed).lower())
            self.client.set_tag(row.run_id, "tune.epochs", str(row.epochs))
            self.client.set_tag(row.run_id, "tune.status", row.status)
            self.client.set_terminated(row.run_id, "FAILED" if failed else "FINISHED")
            self._advance()
            values = " ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
            valid = f"{row.valid:.4f}" if row.valid >= 0 else "-"
            self.log(
                f"trial {row.number} ({self.finished}/{self.total} done) {row.status:<13} after "
                f"{row.epochs} epoch(s), {seconds:.0f} s: valid {self.metric.key} {valid}  {values}"
            )

    return Tracker


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _params_of(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values named as `shopsight train` names them in MLflow (loop.lr, model.d_model)."""
    return {f"{'loop' if k in LOOP_KEYS else 'model'}.{k}": v for k, v in config.items()}


def max_concurrent_trials(workers: int, gpus_per_worker: float, threads_per_worker: int = 1) -> int:
    """How many trials' Train runs fit in the Ray cluster at once (each waits for all its workers)."""
    import ray

    resources = ray.cluster_resources()
    per_trial_cpus = workers * threads_per_worker + TRIAL_CPUS
    limit = int(resources.get("CPU", 1) // per_trial_cpus)
    if limit == 0:  # else every trial's workers wait for CPUs that never come
        raise ShopsightError(
            f"a trial needs {per_trial_cpus:g} CPUs ({workers} workers x {threads_per_worker} threads, "
            f"plus the trial's own {TRIAL_CPUS:g}) but the Ray cluster has {resources.get('CPU', 0):g}"
        )
    if gpus_per_worker > 0:
        limit = min(limit, int(resources.get("GPU", 0) // (workers * gpus_per_worker)))
    return max(1, limit)


def tune_model(
    settings: Settings,
    prepared: Prepared,
    trials: int,
    epochs: int,
    *,
    loop: LoopConfig | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0,
    seed: int = 0,
    space: dict[str, Any] | None = None,
    grace_period: int = 1,
    reduction_factor: float = 2,
    max_concurrent: int | None = None,
    run_name: str | None = None,
    registered_model: str | None = None,
    log: Callable[[str], None] = print,
) -> TuneSummary:
    """Sweep ``prepared``'s model (its task's data, made ready by the task's ``prepare``) with ``trials``
    trials of up to ``epochs`` epochs; register the best.

    Args:
        loop: fixed loop settings; ``epochs`` is the trials' maximum and validation runs every epoch.
        space: a Tune search space instead of :func:`search_space`'s (keys in ``LOOP_KEYS`` go to the
            loop, the others to the model's config, over ``prepared``'s).
        max_concurrent: trials at once; by default as many as the cluster's CPUs (and GPUs) hold.

    Returns:
        The parent run, every trial, the best trial's run and parameters, the registered version and its
        test metrics beside the task's baselines.

    Raises:
        ShopsightError: a model without a search space, or every trial failed.
    """
    import mlflow
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    task, model = prepared.task, prepared.model_name
    check_tunable(model)
    if trials < 1 or epochs < 1:
        raise ShopsightError("--trials and --epochs must be at least 1")
    space = dict(space) if space is not None else search_space(model, task, prepared.config["model_config"])
    registered_model = registered_model or task.registered_model
    metric_key = f"valid_{task.metric.key}"
    started = time.perf_counter()
    loop = LoopConfig(**{**asdict(loop or LoopConfig()), "epochs": epochs, "eval_every": 1, "seed": seed})
    model_config = dict(prepared.config["model_config"])
    if not ray.is_initialized():
        raise ShopsightError("Ray is not started: call ray.init() (the CLI starts it) before tuning")
    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(task.experiment)
    run_name = run_name or f"tune-{task.name}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    identity = prepared.identity
    storage = storage_path(settings)
    fixed = {
        "worker": prepared.worker,
        "config": prepared.config,
        "metric": task.metric.key,
        "model_config": model_config,
        "loop": asdict(loop),
        "workers": workers,
        "gpus_per_worker": gpus_per_worker,
        "storage_path": f"{storage}/{run_name}-trials",
        "worker_resources": settings.ray.worker_resources,
    }
    concurrent = max_concurrent or max_concurrent_trials(workers, gpus_per_worker)
    with mlflow.start_run(run_name=run_name) as parent:
        parent_id = parent.info.run_id
        run_url = f"{uri}/#/experiments/{experiment.experiment_id}/runs/{parent_id}"
        tags = {**identity, "model": model, "task": task.name, **prepared.tags}
        mlflow.set_tags({**tags, "kind": "tune"})
        log_dataset(identity)
        common = {
            "model": model,
            "workers": workers,
            "gpus_per_worker": gpus_per_worker,
            **prepared.params,
            **{f"model.{k}": v for k, v in model_config.items() if k not in space},
            **{f"loop.{k}": v for k, v in asdict(loop).items() if k not in space},
        }
        mlflow.log_params(
            {
                **common,
                "tune.trials": trials,
                "tune.max_epochs": epochs,
                "tune.seed": seed,
                "tune.search": "optuna (TPE)",
                "tune.scheduler": f"asha (grace {grace_period}, reduction {reduction_factor})",
                "tune.max_concurrent": concurrent,
                "tune.space": "; ".join(f"{k}: {_describe(v)}" for k, v in space.items()),
            }
        )
        log(f"MLflow run {run_url}")
        for line in prepared.notes:
            log(line)
        log(f"{trials} trials of {model} ({task.name}), up to {epochs} epochs each, {concurrent} at a time")
        scheduler = _asha()(
            time_attr="epoch",  # metric and mode come from the TuneConfig
            max_t=epochs,
            grace_period=min(grace_period, epochs),
            reduction_factor=reduction_factor,
        )
        tracker = _tracker(tune.Callback)(
            uri,
            experiment.experiment_id,
            parent_id,
            run_name,
            tags,
            common,
            scheduler,
            trials,
            task.metric,
            log,
        )
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trial, fixed=fixed), {"cpu": TRIAL_CPUS}),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric_key,
                mode="max",
                search_alg=OptunaSearch(seed=seed),
                scheduler=scheduler,
                num_samples=trials,
                max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(
                name=run_name, storage_path=str(storage), callbacks=[tracker], verbose=0
            ),
        )
        tracker.epochs = epochs
        with progress_bar() as bar:  # every trial's epochs, a stopped trial's as if it had run them all
            task_id = bar.add_task("trial epochs", total=trials * epochs)
            tracker.show = lambda done: bar.update(task_id, completed=done)
            grid = tuner.fit()
        release_orphaned_placement_groups(wait_s=60)  # the sweep is over: no Train run of it holds CPUs
        rows = _rows(tracker)
        done = [row for row in rows if row.status != "failed"]
        if not done:
            errors = [str(r.error).strip().splitlines()[-1] for r in grid if r.error is not None]
            raise ShopsightError(f"all {trials} trials failed; the first: {errors[0] if errors else '?'}")
        best_row = max(done, key=lambda row: row.valid)
        best_result = next((r for r in grid if (r.metrics or {}).get("trial_id") == best_row.trial_id), None)
        if best_result is None:
            raise ShopsightError(f"Tune returned no result for the best trial {best_row.trial_id}")
        state = _best_state(best_result, metric_key)
        best_model_config, _ = _split_config(best_row.params, fixed)
        candidate = prepared.finish(state, best_model_config)
        candidate.tags["tune.parent_run_id"] = parent_id
        # the best trial's child run gets the test protocol and the model: the version links back to it
        with mlflow.start_run(run_id=best_row.run_id, nested=True):
            log_dataset(identity)
            version = register(uri, best_row.run_id, task, candidate, registered_model, identity)
        mlflow.log_params({f"best.{k}": v for k, v in _params_of(best_row.params).items()})
        mlflow.set_tags(
            {
                "tune.best_run_id": best_row.run_id,
                "tune.best_trial_id": best_row.trial_id,
                "registered_model": f"{registered_model}/{version}",
            }
        )
        mlflow.log_metrics(
            {
                f"best_{mlflow_name(metric_key)}": best_row.valid,
                "best_epoch": float(state["epoch"]),
                "trials_stopped_early": float(sum(r.status == "stopped early" for r in rows)),
                "trials_failed": float(len(rows) - len(done)),
                **{f"test_{mlflow_name(k)}": v for k, v in candidate.metrics.items()},
                **{
                    f"{name}_{mlflow_name(k)}": v
                    for name, metrics in candidate.baselines.items()
                    for k, v in metrics.items()
                },
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "trials.csv").write_text(_csv(rows, task.metric.key))
            (Path(tmp) / "trials.md").write_text(_markdown(rows, best_row, task.metric.label))
            mlflow.log_artifacts(tmp, artifact_path="tune")
    return TuneSummary(
        parent_run_id=parent_id,
        run_url=run_url,
        best_run_id=best_row.run_id,
        best_params=best_row.params,
        best_valid=best_row.valid,
        registered_model=registered_model,
        version=version,
        test=candidate.metrics,
        baselines=candidate.baselines,
        trials=rows,
        seconds=time.perf_counter() - started,
    )


def _describe(domain: Any) -> str:
    categories = getattr(domain, "categories", None)
    if categories is not None:
        return "|".join(str(c) for c in categories)
    lower, upper = getattr(domain, "lower", None), getattr(domain, "upper", None)
    if lower is not None:
        sampler = type(getattr(domain, "sampler", None)).__name__.lower()
        return f"{'log' if 'log' in sampler else ''}uniform[{lower:g}, {upper:g}]"
    return str(domain)


def _rows(tracker) -> list[TrialRow]:
    """One row per trial, in the order the trials started."""
    return [tracker.rows[trial_id] for trial_id in sorted(tracker.rows, key=lambda t: tracker.rows[t].number)]


def _best_state(result, metric_key: str) -> dict:
    """The best trial's best checkpoint (highest validation metric among those Train kept)."""
    from ray.train import Checkpoint

    frame = result.metrics_dataframe
    if frame is None or "checkpoint_path" not in frame:
        raise ShopsightError(f"trial {result.path} reported no checkpoint")
    for _, row in frame.sort_values([metric_key, "epoch"], ascending=[False, True]).iterrows():
        path = row.get("checkpoint_path")
        if not isinstance(path, str) or not path:
            continue
        try:
            with Checkpoint(path).as_directory() as folder:
                return torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)
        except (FileNotFoundError, OSError):
            continue  # Train keeps only the best few; a lower-ranked one may be gone
    raise ShopsightError(f"no checkpoint of trial {result.path} is left to register")


def _csv(rows: list[TrialRow], metric: str) -> str:
    keys = sorted({k for row in rows for k in row.params})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "trial_id", "run_id", "status", "epochs", f"best_valid_{metric}", *keys])
    for row in rows:
        writer.writerow(
            [row.number, row.trial_id, row.run_id, row.status, row.epochs, f"{row.valid:.6f}"]
            + [row.params.get(k, "") for k in keys]
        )
    return out.getvalue()


def _markdown(rows: list[TrialRow], best: TrialRow, metric_label: str) -> str:
    keys = sorted({k for row in rows for k in row.params})
    lines = [
        f"| trial | status | epochs | best valid {metric_label} | " + " | ".join(keys) + " | MLflow run |",
        "| ---: | --- | ---: | ---: | " + " | ".join("---" for _ in keys) + " | --- |",
    ]
    for row in rows:
        mark = " (best)" if row is best else ""
        values = " | ".join(_short(row.params.get(k, "")) for k in keys)
        lines.append(
            f"| {row.number}{mark} | {row.status} | {row.epochs} | {row.valid:.4f} | {values} | "
            f"{row.run_id} |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "TUNABLE_MODELS",
    "TrialRow",
    "TuneSummary",
    "check_tunable",
    "release_orphaned_placement_groups",
    "search_space",
    "tune_model",
]
