"""Ray Train around the fit loop: ``TorchTrainer(train_loop_per_worker=...)`` runs a task's worker on every
Ray worker (DDP: gloo on CPUs, NCCL on GPUs). The runtime names no task: a task hands
:func:`train_with_ray` its worker, either :func:`fit_worker` around its ``setup(config, loop) -> (model,
step)`` (the one fit loop of :mod:`shopsight.training.runtime.loop`), or a function of its own (the GAN,
which trains on one worker with its own loop) built from :class:`Reporter` and :func:`load_checkpoint`.

Every epoch the workers report metrics and rank 0 a checkpoint (model, optimizer, epoch, weight average);
``CheckpointConfig`` keeps the best ``keep_checkpoints`` by the task's validation metric. A worker that dies
makes Ray restart the group (``FailureConfig(max_failures)``), and the loop resumes from the last
checkpoint. Running again with the same ``name`` and ``storage_path`` resumes the run instead of starting
over.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from shopsight.platform import ShopsightError
from shopsight.training.runtime.loop import EpochResult, LoopConfig, fit

CHECKPOINT_FILE = "state.pt"


class Reporter:
    """What every task does after an epoch: metrics to Ray (and MLflow), rank 0's checkpoint, and the
    injected failure of the fault-tolerance tests."""

    def __init__(self, config: dict[str, Any], rank: int) -> None:
        self.config, self.rank = config, rank

    def announce(self, world_size: int, checkpoint, start_epoch: int) -> None:
        """Where this rank runs and where it starts: the job log shows placement and resumption."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        now = datetime.now().isoformat(sep=" ", timespec="milliseconds")
        print(f"worker rank {self.rank} of {world_size} on node {node}, starting {now}", flush=True)
        if checkpoint:
            print(
                f"worker rank {self.rank} resumes after epoch {start_epoch} ({checkpoint.path})", flush=True
            )

    def report(self, metrics: dict[str, float], state: dict[str, Any]) -> None:
        import ray.train

        epoch = int(metrics["epoch"])
        if self.rank == 0 and self.config.get("mlflow"):
            _log_epoch(self.config["mlflow"], metrics, epoch)
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state, Path(folder) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)
        # fault injection for tests: fail once, after epoch k is checkpointed, so a restart resumes at k+1
        fail_after = self.config.get("fail_after_epoch")
        marker = self.config.get("failure_marker")
        if fail_after and epoch == fail_after and marker and not os.path.exists(marker):
            Path(marker).parent.mkdir(parents=True, exist_ok=True)
            Path(marker).write_text("failed once\n")  # the restarted worker must not fail again
            raise RuntimeError(f"injected worker failure after epoch {fail_after}")


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
    start_epoch, optimizer_state, average_state = 0, None, None
    checkpoint, state = load_checkpoint()
    if state:
        model.load_state_dict(state["model"])
        optimizer_state, start_epoch, average_state = state["optimizer"], state["epoch"], state.get("average")
    context = ray.train.get_context()
    reporter = Reporter(config, context.get_world_rank())
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
            key: last_metric["value"],  # carried between validations: checkpoints are ranked by it
            **{f"valid_{k}": v for k, v in result.valid.items()},
        }
        state = {
            "model": model.state_dict(),  # the weights training continues from
            "average": average.state() if average else None,  # with swa_start: what was validated
            "optimizer": optimizer.state_dict(),
            "epoch": result.epoch,
            "metrics": {key: last_metric["value"]},
            "model_name": config["model"],
            "model_config": config["model_config"],
        }
        reporter.report(metrics, state)

    fit(
        model,
        step,
        loop,
        device=ray.train.torch.get_device(),
        start_epoch=start_epoch,
        optimizer_state=optimizer_state,
        average_state=average_state,
        on_epoch=on_epoch,
    )


def _log_epoch(mlflow_run: tuple[str, str], metrics: dict, epoch: int) -> None:
    """Per-epoch metrics into the driver's MLflow run, live (MLflow names allow no '@')."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri, run_id = mlflow_run
    now = int(time.time() * 1000)
    batch = [Metric(k.replace("@", "_at_"), float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]
    MlflowClient(uri).log_batch(run_id, metrics=batch)


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
    }
    trainer = TorchTrainer(
        train_loop_per_worker=worker,
        train_loop_config=config,
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
                checkpoint_score_attribute=f"valid_{metric}",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
