"""The one fit loop, for every task. It runs in one process as is; under ``torch.distributed`` (torchrun,
or Ray Train's TorchTrainer) each rank trains on its own share of the epoch and DistributedDataParallel
keeps the replicas equal. Ray only wraps this loop; it never replaces it.

A task plugs in a :class:`Step`: its training batches for one rank, the loss of one batch, and the
validation metrics. The loop owns everything else: the optimizer, bf16 autocast, gradient clipping,
validation every ``eval_every`` epochs, early stopping on the task's metric with ``patience``, the best
weights, weight averaging, the learning-rate schedule, and resumption from a checkpoint (``start_epoch``,
``optimizer_state``, ``average_state``, ``loop_state``). Each epoch prints one line: loss, validation
metrics, samples/s, seconds.

``epochs`` is a cap: a run ends at its validation plateau, once ``patience`` epochs (whole validations; by
default 4 validations) bring no better metric. Each epoch's result carries the CPU seconds spent so far and
the best epoch, so a run says what reaching its plateau cost.

With ``swa_start`` the weights at the end of every epoch from that one on are averaged (stochastic weight
averaging, Izmailov et al. 2018), and from then on validation, early stopping and the returned model use
the average. ``swa_start="auto"`` starts the average where the validation curve flattens: at the first
validation that improves on the best so far by less than ``swa_threshold`` (relative), or not at all.
Training itself is unchanged: the same seed follows the same trajectory with or without it.

``lr_schedule``: ``constant`` (the default: a measurement on games.txt did not show the schedules helping,
docs/training.md), ``cosine`` (linear warm-up over ``warmup_epochs``, then cosine decay to 1% of ``lr`` at
the ``epochs`` cap) or ``plateau`` (the same warm-up, then the rate halves at every validation without a
better metric).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from shopsight.training.runtime.options import LR_SCHEDULES, SWA_AUTO

PATIENCE_VALIDATIONS = 4  # the default patience, in validations: 4 x eval_every epochs


@dataclass(frozen=True)
class LoopConfig:
    """How to train (not what: that is the model's config)."""

    epochs: int = 200  # the cap: a run normally ends earlier, at its validation plateau (patience)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad_norm: float = 5.0
    # epochs without a better validation metric before stopping, counted in whole validations (rounded up
    # to a multiple of eval_every); None: PATIENCE_VALIDATIONS validations
    patience: int | None = None
    eval_every: int = 5
    eval_users: int | None = 5000  # validation on a seeded subset; the final test uses every user
    bf16: bool | None = None  # None: on CUDA only
    seed: int = 0
    distill_weight: float = 0.5  # with teachers: the distillation term's share of the loss
    # average the weights of every epoch from this one on (0: no averaging; "auto": from where the
    # validation curve flattens, see swa_threshold)
    swa_start: int | str = 0
    swa_threshold: float = 0.01  # auto: a validation improving the best by less than this share starts it
    lr_schedule: str = "constant"  # one of LR_SCHEDULES
    warmup_epochs: int = 5  # cosine and plateau: the rate rises linearly from lr/10 to lr over these

    def __post_init__(self) -> None:
        if not (self.swa_start == SWA_AUTO or (isinstance(self.swa_start, int) and self.swa_start >= 0)):
            raise ValueError(f"swa_start must be an epoch (0: off) or {SWA_AUTO!r}, not {self.swa_start!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            known = ", ".join(LR_SCHEDULES)
            raise ValueError(f"lr_schedule must be one of {known}, not {self.lr_schedule!r}")
        if min(self.epochs, self.eval_every, self.patience or 1) < 1 or self.warmup_epochs < 0:
            raise ValueError("epochs, eval_every and patience must be positive, warmup_epochs not negative")

    @property
    def patience_epochs(self) -> int:
        """Epochs without a better validation metric before stopping: whole validations, at least one
        (a patience shorter than ``eval_every`` could not be observed between two validations)."""
        validations = math.ceil(self.patience / self.eval_every) if self.patience else PATIENCE_VALIDATIONS
        return max(1, validations) * self.eval_every


@dataclass
class EpochResult:
    epoch: int
    loss: float
    samples_per_second: float
    seconds: float
    valid: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # process CPU time of training and validation so far, summed over the ranks
    best_epoch: int = 0  # the epoch of the best validation metric so far (0: none yet)
    lr: float = 0.0  # the learning rate this epoch trained with
    # what a checkpoint needs to resume the loop exactly: the schedule's state and the loop's progress
    # (best metric, patience, CPU time); fit(loop_state=...) takes it back
    loop_state: dict = field(default_factory=dict)


@dataclass
class Progress:
    """What the loop knows across epochs, and across a resumption (it travels in ``loop_state``)."""

    best_metric: float = -math.inf
    best_epoch: int = 0
    since_best: int = 0  # epochs since the best validation
    cpu_seconds: float = 0.0
    cpu_seconds_at_best: float = 0.0
    swa_from: int = 0  # the epoch weight averaging started at (0: not yet)

    def state(self) -> dict:
        return dict(self.__dict__)


class LearningRate:
    """The learning-rate schedule (``LoopConfig.lr_schedule``), stepped once per epoch; its state goes
    into checkpoints beside the optimizer's."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: LoopConfig) -> None:
        from torch.optim import lr_scheduler

        self.optimizer, self.kind = optimizer, cfg.lr_schedule
        self.warmup_epochs = min(cfg.warmup_epochs, cfg.epochs - 1) if self.kind != "constant" else 0
        self.warmup = (
            lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=self.warmup_epochs)
            if self.warmup_epochs
            else None
        )
        self.decay: Any = None
        if self.kind == "cosine":
            self.decay = lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(1, cfg.epochs - self.warmup_epochs), eta_min=cfg.lr * 0.01
            )
        elif self.kind == "plateau":
            self.decay = lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)
        self.epochs_done = 0

    @property
    def current(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def after_epoch(self) -> None:
        self.epochs_done += 1
        if self.warmup and self.epochs_done <= self.warmup_epochs:
            self.warmup.step()
        elif self.kind == "cosine":
            self.decay.step()

    def after_validation(self, metric: float) -> None:
        if self.kind == "plateau" and self.epochs_done > self.warmup_epochs:
            self.decay.step(metric)

    def state(self) -> dict:
        return {
            "epochs_done": self.epochs_done,
            "warmup": self.warmup.state_dict() if self.warmup else None,
            "decay": self.decay.state_dict() if self.decay else None,
            "lr": [group["lr"] for group in self.optimizer.param_groups],
        }

    def load(self, state: dict) -> None:
        self.epochs_done = state["epochs_done"]
        if self.warmup and state.get("warmup"):
            self.warmup.load_state_dict(state["warmup"])
        if self.decay and state.get("decay"):
            self.decay.load_state_dict(state["decay"])
        for group, lr in zip(self.optimizer.param_groups, state["lr"], strict=True):
            group["lr"] = lr


class Step(Protocol):
    """What a task plugs into the loop."""

    metric: str  # the key of ``validate``'s result that early stopping watches (higher is better)
    label: str  # how that metric is named in the log, e.g. "NDCG@10"
    betas: tuple[float, float]  # Adam's

    def batches(self, epoch: int, rank: int, world: int) -> Iterable[tuple]:
        """This rank's training batches of ``epoch``; every rank gets as many, each drawn from its seeds."""

    def loss(self, model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
        """The mean loss of one batch (runs inside DDP's forward, so its gradients are synchronised)."""

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation metrics of ``model`` (in eval mode)."""


class WeightAverage:
    """The running mean of a model's weights, one snapshot per epoch (what ``swa_start`` keeps)."""

    def __init__(self, state: dict | None = None) -> None:
        self.count: int = state["count"] if state else 0
        # a checkpoint from before the first snapshot holds an empty mean: the first update starts it
        self.mean: dict[str, torch.Tensor] | None = state["mean"] if state and state["count"] else None

    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        if self.mean is None:
            self.mean = {k: v.detach().clone() for k, v in current.items()}
        else:
            share = 1 / (self.count + 1)  # of the new snapshot in the mean
            for k, v in current.items():
                if v.is_floating_point():
                    self.mean[k].mul_(1 - share).add_(v.detach(), alpha=share)
        self.count += 1

    def state(self) -> dict:
        """For checkpoints: ``WeightAverage(state)`` continues the same average."""
        return {"count": self.count, "mean": {k: v.clone() for k, v in (self.mean or {}).items()}}


def evaluated_weights(checkpoint: dict) -> dict:
    """The weights a checkpoint's validation metrics describe: the average once averaging has begun."""
    average = checkpoint.get("average")
    return average["mean"] if average and average["count"] else checkpoint["model"]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 outside ``torch.distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def epoch_share(units: np.ndarray, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This rank's share of ``units`` for ``epoch``: every rank draws the same permutation, then takes
    its own equal-sized slice (the remainder is left out, so every rank runs as many batches)."""
    order = np.random.default_rng([seed, epoch]).permutation(units)
    return order[: len(order) // world * world][rank::world]


class _LossOf(nn.Module):
    """DDP synchronises gradients of what runs through forward(): so forward computes the loss."""

    def __init__(self, model: nn.Module, step: Step, device: torch.device) -> None:
        super().__init__()
        self.model, self.step, self.device = model, step, device

    def forward(self, batch: tuple) -> torch.Tensor:
        return self.step.loss(self.model, batch, self.device)


def fit(
    model: nn.Module,
    step: Step,
    cfg: LoopConfig,
    *,
    device: str | torch.device = "cpu",
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    average_state: dict | None = None,
    loop_state: dict | None = None,
    on_epoch: Callable[..., None] | None = None,
    log: Callable[[str], None] = print,
) -> list[EpochResult]:
    """Train ``model`` with ``step`` until its validation plateau, for at most ``cfg.epochs`` epochs.

    Args:
        start_epoch: resume after this epoch (with ``optimizer_state``, ``loop_state`` (an epoch result's,
            from the same checkpoint) and, with ``swa_start``, ``average_state``).
        on_epoch: ``on_epoch(result, model, optimizer, average)`` after every epoch (checkpointing,
            reporting; ``average`` is the :class:`WeightAverage` or None); raising stops the run.

    Returns:
        One result per epoch run. The model ends with the weights of the best validation epoch (the
        average of the epochs up to it, with ``swa_start``) among the epochs this call ran; after a
        resumption that found no better epoch, the last weights (the best are in the checkpoints).
    """
    rank, world = rank_and_world()
    device = torch.device(device)
    model.to(device)
    step_module: nn.Module = _LossOf(model, step, device)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=step.betas, weight_decay=cfg.weight_decay
    )
    schedule = LearningRate(optimizer, cfg)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    resumed = loop_state or {}
    if resumed.get("schedule"):
        schedule.load(resumed["schedule"])
    progress = Progress(**resumed.get("progress", {}))
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    auto_swa = cfg.swa_start == SWA_AUTO
    average = WeightAverage(average_state) if cfg.swa_start else None
    evaluated = copy.deepcopy(model) if average else model  # holds the average while it is validated
    best_state = None
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        started, cpu_started, total, samples = time.perf_counter(), time.process_time(), 0.0, 0
        lr = schedule.current
        for batch in step.batches(epoch, rank, world):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = step_module(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            size = len(batch[0])
            total += float(loss.detach()) * size
            samples += size
        schedule.after_epoch()
        seconds = time.perf_counter() - started
        result = EpochResult(epoch + 1, total / max(samples, 1), samples * world / seconds, seconds, lr=lr)
        if average and (average.count if auto_swa else epoch + 1 >= cfg.swa_start):
            average.update(model)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            judged = model
            if average and average.count:
                evaluated.load_state_dict(average.mean)
                judged = evaluated
            judged.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                result.valid = step.validate(judged, device)
            metric = result.valid[step.metric]
            if average is not None and auto_swa and not average.count and _flat(metric, progress, cfg):
                average.update(model)  # this epoch's weights are the average's first snapshot
                progress.swa_from = epoch + 1
                if rank == 0:
                    log(f"weight averaging starts at epoch {epoch + 1}: the validation curve flattens")
            progress.cpu_seconds += _cpu_of_all_ranks(time.process_time() - cpu_started, device, world)
            if metric > progress.best_metric:
                progress.best_metric, progress.best_epoch, progress.since_best = metric, epoch + 1, 0
                progress.cpu_seconds_at_best = progress.cpu_seconds
                best_state = copy.deepcopy(judged.state_dict())
            else:
                progress.since_best += cfg.eval_every
            schedule.after_validation(metric)
        else:
            progress.cpu_seconds += _cpu_of_all_ranks(time.process_time() - cpu_started, device, world)
        result.cpu_seconds, result.best_epoch = progress.cpu_seconds, progress.best_epoch
        result.loop_state = {"schedule": schedule.state(), "progress": progress.state()}
        history.append(result)
        if rank == 0:
            log(_epoch_line(result))
        if on_epoch:
            on_epoch(result, model, optimizer, average)
        if progress.since_best >= cfg.patience_epochs:
            if rank == 0:
                log(
                    f"early stop: no better validation {step.label} for {progress.since_best} epochs "
                    f"(the best: epoch {progress.best_epoch}, {progress.cpu_seconds_at_best:,.0f} CPU s in)"
                )
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def _flat(metric: float, progress: Progress, cfg: LoopConfig) -> bool:
    """Whether a validation metric shows the curve flattening: it improves on the best so far by less
    than ``cfg.swa_threshold`` of it (the first validation has nothing to flatten from)."""
    if progress.best_metric == -math.inf:
        return False
    return metric - progress.best_metric < cfg.swa_threshold * abs(progress.best_metric)


def _cpu_of_all_ranks(seconds: float, device: torch.device, world: int) -> float:
    """This epoch's process CPU seconds, summed over the ranks (what the epoch cost in all)."""
    if world == 1:
        return seconds
    total = torch.tensor([seconds], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total.item())


def _epoch_line(result: EpochResult) -> str:
    valid = " ".join(f"{k} {v:.4f}" for k, v in result.valid.items() if k != "users")
    return (
        f"epoch {result.epoch:>3}  loss {result.loss:.4f}  {valid or '-':<60} "
        f"{result.samples_per_second:>9,.0f} samples/s  {result.seconds:.1f} s"
    )


def to_device(arrays: Iterable[Any], device: torch.device) -> list[torch.Tensor]:
    """Numpy arrays (or tensors) as tensors on ``device``."""
    return [torch.as_tensor(a, device=device) for a in arrays]


__all__ = [
    "LR_SCHEDULES",
    "SWA_AUTO",
    "EpochResult",
    "LearningRate",
    "LoopConfig",
    "Progress",
    "Step",
    "WeightAverage",
    "epoch_share",
    "evaluated_weights",
    "fit",
    "rank_and_world",
    "to_device",
]
