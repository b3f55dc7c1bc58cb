"""The one fit loop, for every task. It runs in one process as is; under ``torch.distributed`` (torchrun,
or Ray Train's TorchTrainer) each rank trains on its own share of the epoch and DistributedDataParallel
keeps the replicas equal. Ray only wraps this loop; it never replaces it.

A task plugs in a :class:`Step`: its training batches for one rank, the loss of one batch, and the
validation metrics. The loop owns everything else: the optimizer, bf16 autocast, gradient clipping,
validation every ``eval_every`` epochs, early stopping on the task's metric with ``patience``, the best
weights, weight averaging, and resumption from a checkpoint (``start_epoch``, ``optimizer_state``,
``average_state``). Each epoch prints one line: loss, validation metrics, samples/s, seconds.

With ``swa_start`` the weights at the end of every epoch from that one on are averaged (stochastic weight
averaging, Izmailov et al. 2018), and from then on validation, early stopping and the returned model use
the average. Training itself is unchanged: the same seed follows the same trajectory with or without it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LoopConfig:
    """How to train (not what: that is the model's config)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad_norm: float = 5.0
    patience: int = 20  # epochs without a better validation metric before stopping
    eval_every: int = 5
    eval_users: int | None = 5000  # validation on a seeded subset; the final test uses every user
    bf16: bool | None = None  # None: on CUDA only
    seed: int = 0
    distill_weight: float = 0.5  # with teachers: the distillation term's share of the loss
    swa_start: int = 0  # average the weights of every epoch from this one on (0: no averaging)


@dataclass
class EpochResult:
    epoch: int
    loss: float
    samples_per_second: float
    seconds: float
    valid: dict[str, float] = field(default_factory=dict)


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
        self.mean: dict[str, torch.Tensor] | None = state["mean"] if state else None

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
    on_epoch: Callable[..., None] | None = None,
    log: Callable[[str], None] = print,
) -> list[EpochResult]:
    """Train ``model`` with ``step`` for up to ``cfg.epochs`` epochs.

    Args:
        start_epoch: resume after this epoch (with ``optimizer_state``, and ``average_state`` with
            ``swa_start``, from a checkpoint).
        on_epoch: ``on_epoch(result, model, optimizer, average)`` after every epoch (checkpointing,
            reporting; ``average`` is the :class:`WeightAverage` or None); raising stops the run.

    Returns:
        One result per epoch run. The model ends with the weights of the best validation epoch (the
        average of the epochs up to it, with ``swa_start``).
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
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    average = WeightAverage(average_state) if cfg.swa_start else None
    evaluated = copy.deepcopy(model) if average else model  # holds the average while it is validated
    best_metric, best_state, since_best = -float("inf"), None, 0
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        started, total, samples = time.perf_counter(), 0.0, 0
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
        seconds = time.perf_counter() - started
        result = EpochResult(epoch + 1, total / max(samples, 1), samples * world / seconds, seconds)
        if average and epoch + 1 >= cfg.swa_start:
            average.update(model)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            judged = model
            if average and average.count:
                evaluated.load_state_dict(average.mean)
                judged = evaluated
            judged.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                result.valid = step.validate(judged, device)
            if result.valid[step.metric] > best_metric:
                best_metric, since_best = result.valid[step.metric], 0
                best_state = copy.deepcopy(judged.state_dict())
            else:
                since_best += cfg.eval_every
        history.append(result)
        if rank == 0:
            log(_epoch_line(result))
        if on_epoch:
            on_epoch(result, model, optimizer, average)
        if since_best >= cfg.patience:
            if rank == 0:
                log(f"early stop: no better validation {step.label} for {since_best} epochs")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


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
    "EpochResult",
    "LoopConfig",
    "Step",
    "WeightAverage",
    "epoch_share",
    "evaluated_weights",
    "fit",
    "rank_and_world",
    "to_device",
]
