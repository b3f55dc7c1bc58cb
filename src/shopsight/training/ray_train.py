"""Ray Train around the plain loops: ``TorchTrainer(train_loop_per_worker=...)`` runs
:func:`shopsight.training.loop.train_next_item` (task ``next_item``) or
:func:`shopsight.training.purchase.train_purchase` (task ``purchase``) on every worker (DDP: gloo on CPUs,
NCCL on GPUs).

Every epoch the workers report metrics and rank 0 a checkpoint (model, optimizer, epoch, best
validation state); ``CheckpointConfig`` keeps the best ``keep_checkpoints``. A worker that dies makes
Ray restart the group (``FailureConfig(max_failures)``), and the loop resumes from the last checkpoint.
Running again with the same ``name`` and ``storage_path`` resumes the run instead of starting over.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from shopsight.training.loop import LoopConfig

CHECKPOINT_FILE = "state.pt"
METRIC = "valid_ndcg@10"
# the validation metric each task keeps the best checkpoints by (and Tune/early stopping watch)
TASK_METRICS = {"next_item": "ndcg@10", "purchase": "roc_auc"}


def _next_item_task(config: dict[str, Any], loop: LoopConfig):
    from shopsight.training.loop import train_next_item
    from shopsight.training.models import build_model
    from shopsight.training.sequences import LeaveOneOut, SequenceData

    data = SequenceData.from_file(config["data"])
    split = LeaveOneOut.split(data)
    model = build_model(config["model"], n_items=data.n_items, **config["model_config"])
    return model, lambda model, **kw: train_next_item(model, split, loop, **kw)


def _purchase_task(config: dict[str, Any], loop: LoopConfig):
    from shopsight.training.models import build_model
    from shopsight.training.models._purchase_head import transfer_pretrained
    from shopsight.training.purchase import train_purchase
    from shopsight.training.purchase_data import PurchaseFeatures, TimeSplit, read_training_set

    split = TimeSplit.of(read_training_set(config["data"]))
    features = PurchaseFeatures(**config["features"])  # fitted once on the driver: every rank the same
    train, valid = features.transform(split.train), features.transform(split.valid)
    model = build_model(config["model"], **config["model_config"])
    if config.get("pretrained"):  # overwritten by a checkpoint when the run resumes
        transfer_pretrained(model, torch.load(config["pretrained"], weights_only=True))
    pos_weight = config.get("pos_weight", 1.0)
    return model, lambda model, **kw: train_purchase(model, train, valid, loop, pos_weight=pos_weight, **kw)


def _worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from shopsight.training.loop import EpochResult

    torch.set_num_threads(config.get("threads_per_worker", 1))
    loop = LoopConfig(**config["loop"])
    torch.manual_seed(loop.seed)  # the same initial weights on every worker and every run
    task = config.get("task", "next_item")
    model, run_loop = (_purchase_task if task == "purchase" else _next_item_task)(config, loop)
    key = TASK_METRICS[task]
    start_epoch, optimizer_state, best = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer_state, start_epoch, best = state["optimizer"], state["epoch"], state.get("best")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # where each rank runs, and where it starts: the job log shows placement and resumption
    node = ray.get_runtime_context().get_node_id()
    now = datetime.now().isoformat(sep=" ", timespec="milliseconds")
    print(f"worker rank {rank} of {context.get_world_size()} on node {node}, starting {now}", flush=True)
    if checkpoint:
        print(f"worker rank {rank} resumes after epoch {start_epoch} ({checkpoint.path})", flush=True)
    last_metric = {"value": best[0] if best else 0.0}

    def on_epoch(result: EpochResult, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if result.valid:
            last_metric["value"] = result.valid[key]
        metrics = {
            "epoch": result.epoch,
            "loss": result.loss,
            "samples_per_second": result.samples_per_second,
            "epoch_seconds": result.seconds,
            f"valid_{key}": last_metric["value"],
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

    run_loop(
        model,
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
    worker_resources: dict[str, float] | None = None,
    model_config: dict[str, Any] | None = None,
    loop: LoopConfig | None = None,
    max_failures: int = 2,
    keep_checkpoints: int = 2,
    threads_per_worker: int = 1,
    fail_after_epoch: int | None = None,
    mlflow: tuple[str, str] | None = None,
    callbacks: list | None = None,
    task: str = "next_item",
    task_config: dict[str, Any] | None = None,
):
    """Train ``model`` on a sequence file with Ray Train; returns Ray's ``Result`` (metrics, checkpoint).

    ``fail_after_epoch`` injects one worker failure after that epoch (to test fault tolerance);
    ``mlflow`` = (tracking URI, run id) logs every epoch's metrics into that run;
    ``worker_resources``: custom Ray resources each worker needs (pins workers to the nodes offering them);
    ``callbacks``: Ray Train ``UserCallback``s (Tune's ``TuneReportCallback`` forwards each epoch to Tune);
    ``task``: ``next_item`` (``data`` is an event or SASRec-format file) or ``purchase`` (``data`` is a
    training set; ``task_config`` holds the fitted ``features``, ``pos_weight`` and an optional
    ``pretrained`` weights file, and ``model_config`` is complete).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train V2 patches the workers' print() into a logger that also echoes to stdout: every epoch line
    # reached the driver twice. Plain print (Ray forwards worker stdout to the driver) says it once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

    storage_path = str(storage_path) if "://" in str(storage_path) else str(Path(storage_path).absolute())
    config = {
        "model": model,
        "data": str(Path(data).absolute()),
        "model_config": model_config or {},
        "loop": asdict(loop or LoopConfig()),
        "threads_per_worker": threads_per_worker,
        "fail_after_epoch": fail_after_epoch,
        "failure_marker": f"{storage_path}/{name}/.injected_failure" if fail_after_epoch else None,
        "mlflow": mlflow,  # (tracking URI, run id): rank 0 logs each epoch's metrics there
        "task": task,
        **(task_config or {}),
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
                **(worker_resources or {}),
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=keep_checkpoints,
                checkpoint_score_attribute=f"valid_{TASK_METRICS[task]}",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
