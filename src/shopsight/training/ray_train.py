"""Ray Train around the plain loops: ``TorchTrainer(train_loop_per_worker=...)`` runs
:func:`shopsight.training.loop.train_next_item` (task ``next_item``) or
:func:`shopsight.training.purchase.train_purchase` (task ``purchase``) on every worker (DDP: gloo on CPUs,
NCCL on GPUs), or :meth:`TabularGAN.fit <shopsight.training.models.gan.TabularGAN.fit>` (task ``gan``) on
one worker: the gradient penalty differentiates the critic's gradient, a double backward that
DistributedDataParallel does not support.

Every epoch the workers report metrics and rank 0 a checkpoint (model, optimizer, epoch, best
validation state); ``CheckpointConfig`` keeps the best ``keep_checkpoints``. A worker that dies makes
Ray restart the group (``FailureConfig(max_failures)``), and the loop resumes from the last checkpoint.
Running again with the same ``name`` and ``storage_path`` resumes the run instead of starting over.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from shopsight.platform import ShopsightError
from shopsight.training.loop import LoopConfig

CHECKPOINT_FILE = "state.pt"
METRIC = "valid_ndcg@10"
# the validation metric each task keeps the best checkpoints by (and Tune/early stopping watch)
TASK_METRICS = {"next_item": "ndcg@10", "purchase": "roc_auc", "gan": "tstr_ratio"}


def _next_item_task(config: dict[str, Any], loop: LoopConfig):
    from shopsight.training.loop import train_next_item
    from shopsight.training.models import build_model
    from shopsight.training.sequences import LeaveOneOut, SequenceData

    data = SequenceData.from_file(config["data"])
    split = LeaveOneOut.split(data)
    teachers = None
    if config.get("teachers"):
        from shopsight.training.distill import load_teachers

        teachers = load_teachers(config["teachers"])
        torch.manual_seed(loop.seed)  # building the teachers drew random numbers: the student starts afresh
    model = build_model(config["model"], n_items=data.n_items, **config["model_config"])
    return model, lambda model, **kw: train_next_item(model, split, loop, teachers=teachers, **kw)


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


class _Reporter:
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


def _quiet_checkpoint_logs() -> None:
    """Ray Train logs two INFO lines per checkpoint on every worker ("Reporting training result ...",
    "Checkpoint successfully created ..."): the epoch line already says it. One logger is named by its
    module, the other by its file path, so both names are muted."""
    from ray.train.v2._internal.execution import context, storage

    for module in (context, storage):
        for name in (module.__name__, module.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)


def _load_checkpoint() -> tuple[Any, dict[str, Any] | None]:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None, None
    with checkpoint.as_directory() as folder:
        return checkpoint, torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from shopsight.training.loop import EpochResult

    _quiet_checkpoint_logs()
    torch.set_num_threads(config.get("threads_per_worker", 1))
    loop = LoopConfig(**config["loop"])
    torch.manual_seed(loop.seed)  # the same initial weights on every worker and every run
    task = config.get("task", "next_item")
    if task == "gan":
        _gan_worker(config)
        return
    model, run_loop = (_purchase_task if task == "purchase" else _next_item_task)(config, loop)
    key = TASK_METRICS[task]
    start_epoch, optimizer_state, best, average_state = 0, None, None, None
    checkpoint, state = _load_checkpoint()
    if state:
        model.load_state_dict(state["model"])
        optimizer_state, start_epoch, best = state["optimizer"], state["epoch"], state.get("best")
        average_state = state.get("average")
    context = ray.train.get_context()
    reporter = _Reporter(config, context.get_world_rank())
    reporter.announce(context.get_world_size(), checkpoint, start_epoch)
    last_metric = {"value": best[0] if best else 0.0}

    def on_epoch(
        result: EpochResult, model: torch.nn.Module, optimizer: torch.optim.Optimizer, average=None
    ) -> None:
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
        state = {
            "model": model.state_dict(),  # the weights training continues from
            "average": average.state() if average else None,  # with swa_start: what was validated
            "optimizer": optimizer.state_dict(),
            "epoch": result.epoch,
            "best": None,
            "model_name": config["model"],
            "model_config": config["model_config"],
        }
        reporter.report(metrics, state)

    run_loop(
        model,
        device=ray.train.torch.get_device(),
        start_epoch=start_epoch,
        optimizer_state=optimizer_state,
        on_epoch=on_epoch,
        **({"average_state": average_state} if task == "next_item" else {}),
    )


def _gan_worker(config: dict[str, Any]) -> None:
    """The GAN's fit on one worker, checkpointed every epoch with everything a resume needs (both
    networks, both optimizers, the random generators). Validated on the validation users: TSTR / TRTR
    (gradient-boosted trees fitted on 2,000 synthetic rows, and on 2,000 real training rows with the same
    labels, scored on the validation rows) picks the best epoch; the mean Kolmogorov-Smirnov distance of
    the synthetic rows to the validation rows is logged beside it. Marginals alone would pick an early
    epoch: they settle before the columns' joint structure, which the utility measure needs."""
    import ray.train
    import ray.train.torch

    from shopsight.training.models import build_model
    from shopsight.training.synthetic import column_distances, tstr_ratio
    from shopsight.training.train_gan import GanData

    data = GanData.read(config["data"], seed=config["split_seed"])
    device = ray.train.torch.get_device()
    gan = build_model("gan", **{**config["model_config"], "device": str(device), "log_every": 1})
    checkpoint, resume = _load_checkpoint()
    reporter = _Reporter(config, ray.train.get_context().get_world_rank())
    reporter.announce(1, checkpoint, resume["epoch"] if resume else 0)
    reference = data.valid.sample(min(len(data.valid), 2000), random_state=0)
    real = data.train.sample(min(len(data.train), 2000), random_state=0)
    features = [*data.numeric, *data.categorical]

    def on_epoch(entry: dict[str, float], state: dict[str, Any]) -> None:
        epoch = int(entry["epoch"])
        synthetic = gan.sample(len(real), list(real[data.label]), seed=epoch)
        distances = column_distances(reference, synthetic, data.numeric, data.categorical)["mean"]
        utility = tstr_ratio(real, synthetic, reference, data.label, features, categorical=data.categorical)
        metrics = {
            "epoch": epoch,
            "loss": entry["critic_loss"],
            "generator_loss": entry["generator_loss"],
            "wasserstein": entry["wasserstein"],
            "samples_per_second": len(data.train) / entry["seconds"],
            "epoch_seconds": entry["seconds"],
            "valid_tstr_ratio": utility["ratio"],
            "valid_tstr_auc": utility["tstr_auc"],
            "valid_ks": distances["ks"],
            "valid_tvd": distances.get("tvd", 0.0),
        }
        print(
            f"epoch {epoch:>3}  critic {entry['critic_loss']:.4f}  generator {entry['generator_loss']:.4f}  "
            f"wasserstein {entry['wasserstein']:.4f}  valid TSTR/TRTR {utility['ratio']:.4f} "
            f"KS {distances['ks']:.4f}  "
            f"{metrics['samples_per_second']:>9,.0f} rows/s  {entry['seconds']:.1f} s",
            flush=True,
        )
        reporter.report(metrics, state)

    gan.fit(
        data.train,
        data.label,
        numeric=data.numeric,
        categorical=data.categorical,
        log=None,
        resume=resume,
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
    ``task``: ``next_item`` (``data`` is an event or SASRec-format file; ``task_config`` may hold
    ``teachers`` to distil from, as :func:`~shopsight.training.distill.load_teachers` reads them),
    ``purchase`` (``data`` is a training set; ``task_config`` holds the fitted ``features``,
    ``pos_weight`` and an optional ``pretrained`` weights file, and ``model_config`` is complete) or
    ``gan`` (``data`` is a training set, ``model_config`` the GANConfig's fields, ``task_config`` the
    ``split_seed``; one worker only).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train V2 patches the workers' print() into a logger that also echoes to stdout: every epoch line
    # reached the driver twice. Plain print (Ray forwards worker stdout to the driver) says it once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

    if task == "gan" and workers != 1:
        raise ShopsightError(
            f"the GAN trains on one worker, not {workers}: its gradient penalty needs a double backward, "
            "which DistributedDataParallel does not support"
        )
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
