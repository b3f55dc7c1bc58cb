"""Ray Train around the fit loop: ``TorchTrainer(train_loop_per_worker=...)`` runs a task's worker on every
Ray worker (DDP: gloo on CPUs, NCCL on GPUs). The runtime names no task: a task hands
:func:`train_with_ray` its worker, either :func:`fit_worker` around its ``setup(config, loop) -> (model,
step)`` (the one fit loop of :mod:`shopsight.training.runtime.loop`), or a function of its own (the GAN,
which trains on one worker with its own loop) built from :class:`Reporter` and :func:`load_checkpoint`.

Every epoch the workers report metrics (with the CPU seconds so far and the best epoch) and rank 0 a
checkpoint (model, optimizer, epoch, weight average, the learning-rate schedule and the loop's progress);
``CheckpointConfig`` keeps the best ``keep_checkpoints`` validated epochs by the task's validation metric,
and the latest. A worker that dies
makes Ray restart the group (``FailureConfig(max_failures)``), and the loop resumes from the last
checkpoint. Running again with the same ``name`` and ``storage_path`` resumes the run instead of starting
over.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from shopsight.platform import ShopsightError
from shopsight.training.runtime import feed
from shopsight.training.runtime.loop import EpochResult, LoopConfig, fit

CHECKPOINT_FILE = "state.pt"
HISTORY = "history"  # the checkpoint's key of every epoch's metrics so far
# What Ray ranks the checkpoints by: the validation metric at a validated epoch, and below any metric at
# the epochs between validations. Ranked by the metric carried between validations, the epochs after the
# best one tied with it and, later ties winning, displaced it: the best checkpoint held weights trained
# past the validated ones.
CHECKPOINT_SCORE = "checkpoint_score"
UNVALIDATED = -1e30


class Reporter:
    """What every task does after an epoch: metrics to Ray (and MLflow), rank 0's checkpoint, and the
    injected failure of the fault-tolerance tests.

    Rank 0's checkpoints also carry every epoch's metrics so far (``history``), restored on resumption: the
    driver logs from the last checkpoint whatever the tracking server did not take during training
    (:func:`epoch_history`)."""

    def __init__(self, config: dict[str, Any], rank: int, resumed: dict[str, Any] | None = None) -> None:
        self.config, self.rank = config, rank
        self.history: list[dict[str, Any]] = list((resumed or {}).get(HISTORY, []))
        live = rank == 0 and config.get("mlflow")
        self.tracking = _EpochLog(*config["mlflow"], say=self.say) if live else None

    def say(self, line: str) -> None:
        """A line for whoever started the run (:mod:`~shopsight.training.runtime.feed`)."""
        feed.say(self.config.get("feed"), line)

    def announce(self, world_size: int, checkpoint, start_epoch: int) -> None:
        """Where this rank runs and where it starts: the job log shows placement and resumption."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        now = datetime.now().isoformat(sep=" ", timespec="milliseconds")
        if world_size > 1:  # where the ranks landed matters once there are several
            self.say(f"worker rank {self.rank} of {world_size} on node {node}, starting {now}")
        if checkpoint:
            self.say(f"worker rank {self.rank} resumes after epoch {start_epoch} ({checkpoint.path})")

    def report(self, metrics: dict[str, float], state: dict[str, Any], validated: bool = True) -> None:
        """Report an epoch's metrics (and rank 0's checkpoint). ``validated``: whether this epoch's weights
        were validated; only those compete for the best checkpoint (:data:`CHECKPOINT_SCORE`)."""
        import ray.train

        epoch = int(metrics["epoch"])
        valid_key = f"valid_{self.config.get('metric')}"
        score = metrics[valid_key] if validated and valid_key in metrics else UNVALIDATED
        metrics = {**metrics, CHECKPOINT_SCORE: score}
        self.history.append({"at_ms": int(time.time() * 1000), **{k: float(v) for k, v in metrics.items()}})
        if self.tracking:
            self.tracking.send(self.history[-1])
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save({**state, HISTORY: self.history}, Path(folder) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            feed.say(self.config.get("feed"), None, epoch=epoch)
        else:
            ray.train.report(metrics)
        # fault injection for tests: fail once, after epoch k is checkpointed, so a restart resumes at k+1
        fail_after = self.config.get("fail_after_epoch")
        marker = self.config.get("failure_marker")
        if fail_after and epoch == fail_after and marker and not os.path.exists(marker):
            Path(marker).parent.mkdir(parents=True, exist_ok=True)
            Path(marker).write_text("failed once\n")  # the restarted worker must not fail again
            raise RuntimeError(f"injected worker failure after epoch {fail_after}")


class _EpochLog:
    """Rank 0's per-epoch metrics, live in the driver's MLflow run. Training never waits on the tracking
    server: each epoch makes one quick try, and what the server does not take (it restarts, or it died)
    is kept and sent with a later epoch. Whatever is still unsent when training ends, the driver logs
    from the last checkpoint's history."""

    def __init__(self, uri: str, run_id: str, say: Callable[[str], None] = print) -> None:
        self.uri, self.run_id, self.say = uri, run_id, say
        self.pending: list = []
        self.away = False

    def send(self, row: dict[str, Any]) -> None:
        from mlflow import MlflowClient

        from shopsight.platform.mlflow_server import quick_requests

        self.pending += epoch_metrics(row)
        try:
            with quick_requests():
                while self.pending:  # MLflow takes at most 1,000 metrics a batch
                    MlflowClient(self.uri).log_batch(self.run_id, metrics=self.pending[:1000])
                    del self.pending[:1000]
        except Exception as exc:  # noqa: BLE001 - any failure of the server is the same to training
            if not self.away:
                text = str(exc).strip() or type(exc).__name__
                # a server that is away shows as urllib3's long "Max retries exceeded ..." line
                reason = "no answer" if "Max retries exceeded" in text else text.splitlines()[0][:160]
                self.say(
                    f"MLflow at {self.uri} did not take epoch {int(row['epoch'])}'s metrics ({reason}): "
                    "training goes on, and the metrics are sent when it answers"
                )
            self.away = True
            return
        if self.away:
            self.say(f"MLflow at {self.uri} answers again: the epochs it missed are logged")
        self.away = False


def epoch_metrics(row: dict[str, Any]) -> list:
    """One history row (:class:`Reporter`) as MLflow metrics at step ``epoch`` (MLflow names allow no
    '@')."""
    from mlflow.entities import Metric

    epoch, at = int(row["epoch"]), int(row["at_ms"])
    return [
        Metric(k.replace("@", "_at_"), float(v), at, epoch)
        for k, v in row.items()
        if k not in ("epoch", "at_ms", CHECKPOINT_SCORE)
    ]


def epoch_history(result) -> list[dict[str, Any]]:
    """Every epoch's metrics of a finished run, from its last checkpoint (``[]`` without one)."""
    if result.checkpoint is None:
        return []
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False).get(HISTORY, [])


def log_missing_epochs(uri: str, run_id: str, history: list[dict[str, Any]]) -> int:
    """Log into run ``run_id`` the epochs of ``history`` it lacks (by their ``loss`` steps); returns how
    many."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    missing = [row for row in history if int(row["epoch"]) not in logged]
    metrics = [metric for row in missing for metric in epoch_metrics(row)]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    return len(missing)


def quiet_checkpoint_logs() -> None:
    """Ray Train logs two INFO lines per checkpoint on every worker ("Reporting training result ...",
    "Checkpoint successfully created ..."): the epoch line already says it. One logger is named by its
    module, the other by its file path, so both names are muted."""
    from ray.train.v2._internal.execution import context, storage

    for module in (context, storage):
        for name in (module.__name__, module.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)


def load_checkpoint() -> tuple[Any, dict[str, Any] | None]:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None, None
    with checkpoint.as_directory() as folder:
        return checkpoint, torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)


def fit_worker(setup: Callable[[dict[str, Any], LoopConfig], tuple[torch.nn.Module, Any]]) -> Callable:
    """The Ray worker of a task that trains with the fit loop: ``setup(config, loop)`` builds the model and
    the task's :class:`~shopsight.training.runtime.loop.Step` from the run's config."""
    return functools.partial(_fit, setup)


def _fit(setup: Callable, config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    quiet_checkpoint_logs()
    torch.set_num_threads(config.get("threads_per_worker", 1))
    loop = LoopConfig(**config["loop"])
    torch.manual_seed(loop.seed)  # the same initial weights on every worker and every run
    model, step = setup(config, loop)
    start_epoch, optimizer_state, average_state, loop_state = 0, None, None, None
    checkpoint, state = load_checkpoint()
    if state:
        model.load_state_dict(state["model"])
        optimizer_state, start_epoch, average_state = state["optimizer"], state["epoch"], state.get("average")
        loop_state = state.get("loop")  # the schedule and the loop's progress (best metric, patience, CPU)
    context = ray.train.get_context()
    reporter = Reporter(config, context.get_world_rank(), state)
    reporter.announce(context.get_world_size(), checkpoint, start_epoch)
    key = f"valid_{step.metric}"
    last_metric = {"value": (state or {}).get("metrics", {}).get(key, 0.0)}

    def on_epoch(
        result: EpochResult, model: torch.nn.Module, optimizer: torch.optim.Optimizer, average=None
    ) -> None:
        if result.valid:
            last_metric["value"] = result.valid[step.metric]
        metrics = {
            "epoch": result.epoch,
            "loss": result.loss,
            "samples_per_second": result.samples_per_second,
            "epoch_seconds": result.seconds,
            "cpu_seconds": result.cpu_seconds,
            "best_epoch": result.best_epoch,
            "lr": result.lr,
            key: last_metric["value"],  # carried between validations, for the curves and Tune
            **{f"valid_{k}": v for k, v in result.valid.items()},
        }
        state = {
            "model": model.state_dict(),  # the weights training continues from
            "average": average.state() if average else None,  # with swa_start: what was validated
            "optimizer": optimizer.state_dict(),
            "loop": result.loop_state,
            "epoch": result.epoch,
            "cpu_seconds": result.cpu_seconds,
            "metrics": {key: last_metric["value"]},
            "model_name": config["model"],
            "model_config": config["model_config"],
        }
        reporter.report(metrics, state, validated=bool(result.valid))

    fit(
        model,
        step,
        loop,
        device=ray.train.torch.get_device(),
        start_epoch=start_epoch,
        optimizer_state=optimizer_state,
        average_state=average_state,
        loop_state=loop_state,
        on_epoch=on_epoch,
        log=reporter.say,
    )


def train_with_ray(
    worker: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    *,
    metric: str,
    name: str,
    storage_path: Path | str,
    workers: int = 1,
    gpus_per_worker: float = 0,
    worker_resources: dict[str, float] | None = None,
    loop: LoopConfig | None = None,
    max_failures: int = 2,
    keep_checkpoints: int = 2,
    threads_per_worker: int = 1,
    fail_after_epoch: int | None = None,
    mlflow: tuple[str, str] | None = None,
    callbacks: list | None = None,
    show_progress: bool = True,
):
    """Run a task's ``worker`` on ``workers`` Ray workers; returns Ray's ``Result`` (metrics, checkpoints).

    Args:
        worker: :func:`fit_worker` of the task's setup, or the task's own worker function (with an attribute
            ``single_worker`` saying why, when it cannot run on several workers).
        config: what the worker reads: ``model``, ``model_config``, ``data`` and the task's own keys.
        metric: the validation metric (without ``valid_``) the checkpoints are ranked by, higher better.
        fail_after_epoch: inject one worker failure after that epoch (to test fault tolerance).
        mlflow: (tracking URI, run id): rank 0 logs every epoch's metrics into that run.
        worker_resources: custom Ray resources each worker needs (pins workers to the nodes offering them).
        callbacks: Ray Train ``UserCallback``s (Tune's ``TuneReportCallback`` forwards each epoch to Tune).
        show_progress: print the workers' lines here, under a per-epoch bar (:mod:`.feed`); otherwise the
            workers print them (a Tune trial: the sweep shows its own progress).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train V2 patches the workers' print() into a logger that also echoes to stdout: every epoch line
    # reached the driver twice. Plain print (Ray forwards worker stdout to the driver) says it once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

    single = getattr(worker, "single_worker", None)  # why the task cannot run data-parallel, if it cannot
    if single and workers != 1:
        raise ShopsightError(f"the {config['model']} model trains on one worker, not {workers}: {single}")
    storage_path = str(storage_path) if "://" in str(storage_path) else str(Path(storage_path).absolute())
    config = {
        **config,
        "data": str(Path(config["data"]).absolute()),
        "loop": asdict(loop or LoopConfig()),
        "threads_per_worker": threads_per_worker,
        "fail_after_epoch": fail_after_epoch,
        "failure_marker": f"{storage_path}/{name}/.injected_failure" if fail_after_epoch else None,
        "mlflow": mlflow,
        "metric": metric,
    }

    def run(queue=None):
        trainer = TorchTrainer(
            train_loop_per_worker=feed.printed_here(worker),
            train_loop_config={**config, "feed": queue},
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=gpus_per_worker > 0,
                resources_per_worker={
                    "CPU": threads_per_worker,
                    **({"GPU": gpus_per_worker} if gpus_per_worker else {}),
                    **(worker_resources or {}),
                },
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,
                checkpoint_config=CheckpointConfig(
                    num_to_keep=keep_checkpoints,
                    checkpoint_score_attribute=CHECKPOINT_SCORE,
                    checkpoint_score_order="max",
                ),
                failure_config=FailureConfig(max_failures=max_failures),
                callbacks=callbacks,
            ),
        )
        return trainer.fit()

    if not show_progress:
        return run()
    with feed.shown_here((loop or LoopConfig()).epochs, f"{config['model']} epochs") as queue:
        return run(queue)
