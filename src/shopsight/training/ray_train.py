"""Ray Train around the plain loop: ``TorchTrainer(train_loop_per_worker=...)`` runs
:func:`shopsight.training.loop.train_next_item` on every worker (DDP: gloo on CPUs, NCCL on GPUs).

Every epoch the workers report metrics and rank 0 a checkpoint (model, optimizer, epoch, best
validation state); ``CheckpointConfig`` keeps the best ``keep_checkpoints``. A worker that dies makes
Ray restart the group (``FailureConfig(max_failures)``), and the loop resumes from the last checkpoint.
Running again with the same ``name`` and ``storage_path`` resumes the run instead of starting over.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from shopsight.training.loop import LoopConfig

CHECKPOINT_FILE = "state.pt"
METRIC = "valid_ndcg@10"


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from shopsight.training.loop import EpochResult, train_next_item
    from shopsight.training.models import build_model
    from shopsight.training.sequences import LeaveOneOut, SequenceData

    torch.set_num_threads(config.get("threads_per_worker", 1))
    data = SequenceData.from_file(config["data"])
    split = LeaveOneOut.split(data)
    loop = LoopConfig(**config["loop"])
    torch.manual_seed(loop.seed)  # the same initial weights on every worker and every run
    model = build_model(config["model"], n_items=data.n_items, **config["model_config"])
    start_epoch, optimizer_state, best = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer_state, start_epoch, best = state["optimizer"], state["epoch"], state.get("best")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    last_metric = {"value": best[0] if best else 0.0}

    def on_epoch(result: EpochResult, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if result.valid:
            last_metric["value"] = result.valid["ndcg@10"]
        metrics = {
            "epoch": result.epoch,
            "loss": result.loss,
            "samples_per_second": result.samples_per_second,
            "epoch_seconds": result.seconds,
            METRIC: last_metric["value"],
            **{f"valid_{k}": v for k, v in result.valid.items()},
        }
        if rank == 0 and config.get("mlflow"):
            _log_epoch(config["mlflow"], metrics, result.epoch)
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": result.epoch,
                    "best": None,
                    "model_name": config["model"],
                    "model_config": config["model_config"],
                }
                torch.save(state, Path(folder) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)
        # fault injection for tests: fail once, after epoch k is checkpointed, so a restart resumes at k+1
        fail_after = config.get("fail_after_epoch")
        marker = config.get("failure_marker")
        if fail_after and result.epoch == fail_after and marker and not os.path.exists(marker):
            Path(marker).parent.mkdir(parents=True, exist_ok=True)
            Path(marker).write_text("failed once\n")  # the restarted worker must not fail again
            raise RuntimeError(f"injected worker failure after epoch {fail_after}")

    train_next_item(
        model,
        split,
        loop,
        device=ray.train.torch.get_device(),
        start_epoch=start_epoch,
        optimizer_state=optimizer_state,
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
    model: str,
    data: Path | str,
    *,
    name: str,
    storage_path: Path | str,
    workers: int = 1,
    gpus_per_worker: float = 0,
    model_config: dict[str, Any] | None = None,
    loop: LoopConfig | None = None,
    max_failures: int = 2,
    keep_checkpoints: int = 2,
    threads_per_worker: int = 1,
    fail_after_epoch: int | None = None,
    mlflow: tuple[str, str] | None = None,
):
    """Train ``model`` on a sequence file with Ray Train; returns Ray's ``Result`` (metrics, checkpoint).

    ``fail_after_epoch`` injects one worker failure after that epoch (to test fault tolerance);
    ``mlflow`` = (tracking URI, run id) logs every epoch's metrics into that run.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path = Path(storage_path).absolute()
    config = {
        "model": model,
        "data": str(Path(data).absolute()),
        "model_config": model_config or {},
        "loop": asdict(loop or LoopConfig()),
        "threads_per_worker": threads_per_worker,
        "fail_after_epoch": fail_after_epoch,
        "failure_marker": str(storage_path / name / ".injected_failure") if fail_after_epoch else None,
        "mlflow": mlflow,  # (tracking URI, run id): rank 0 logs each epoch's metrics there
    }
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus_per_worker > 0,
            resources_per_worker={
                "CPU": threads_per_worker,
                **({"GPU": gpus_per_worker} if gpus_per_worker else {}),
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=keep_checkpoints, checkpoint_score_attribute=METRIC, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    return trainer.fit()
