"""The plain PyTorch training loop for next-item models. It runs in one process as is; under
``torch.distributed`` (torchrun, or Ray Train's TorchTrainer) it shards users across ranks and wraps the
model in DistributedDataParallel. Ray only wraps this loop; it never replaces it.

Each epoch prints one line: loss, validation metric, samples/s, seconds. Early stopping watches the
validation NDCG@10 (sampled protocol); the best weights are kept.

With ``swa_start`` the weights at the end of every epoch from that one on are averaged (stochastic weight
averaging, Izmailov et al. 2018), and from then on validation, early stopping and the returned model use
the average. Training itself is unchanged: the same seed follows the same trajectory with or without it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from shopsight.training.evaluation import evaluate_next_item
from shopsight.training.sequences import LeaveOneOut, training_batches


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


class _LossOf(nn.Module):
    """DDP synchronises gradients of what runs through forward(): so forward computes the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *batch: torch.Tensor, teacher=None) -> torch.Tensor:
        return self.model.loss(*batch, teacher=teacher)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def scorer(model: nn.Module) -> Callable:
    """``score(seqs, candidates)`` for evaluation: candidate scores, or every item's with None."""

    def score(seqs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        return model.predict(seqs) if candidates is None else model.score(seqs, candidates)

    return score


def train_next_item(
    model: nn.Module,
    split: LeaveOneOut,
    cfg: LoopConfig,
    *,
    device: str | torch.device = "cpu",
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    on_epoch: Callable[..., None] | None = None,
    teachers: Sequence[nn.Module] | None = None,
    average_state: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[EpochResult]:
    """Train ``model`` (with ``loss``, ``score``, ``predict``) on the split's training histories.

    Args:
        start_epoch: resume from this epoch (with ``optimizer_state``, and ``average_state`` with
            ``swa_start``, from a checkpoint).
        on_epoch: ``on_epoch(result, model, optimizer, average)`` after every epoch (checkpointing,
            reporting; ``average`` is the :class:`WeightAverage` or None); raising stops the run.
        teachers: trained models to distil from (:mod:`shopsight.training.distill`), with
            ``cfg.distill_weight``; they score the training inputs once, before the first epoch.

    Returns:
        One result per epoch run. The model ends with the weights of the best validation epoch (the
        average of the epochs up to it, with ``swa_start``).
    """
    rank, world = _dist()
    device = torch.device(device)
    model.to(device)
    step_module: nn.Module = _LossOf(model)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay
    )
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    max_len = model.cfg.max_len
    teacher = None
    if teachers:
        from shopsight.training.distill import Teacher

        started = time.perf_counter()
        teacher = Teacher(teachers, split, max_len, cfg.distill_weight)
        if rank == 0:
            log(
                f"distilling from {len(teachers)} teacher(s): states of the training inputs "
                f"({teacher.nbytes / 2**20:,.0f} MiB) in {time.perf_counter() - started:.1f} s"
            )
    average = WeightAverage(average_state) if cfg.swa_start else None
    evaluated = copy.deepcopy(model) if average else model  # holds the average while it is validated
    trainable = np.flatnonzero(np.array([len(s) >= 2 for s in split.train]))
    best_metric, best_state, since_best = -1.0, None, 0
    history = []
    for epoch in range(start_epoch, cfg.epochs):
        # every rank draws the same permutation, then takes its own equal-sized share
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(trainable)
        share = order[: len(order) // world * world][rank::world]
        batch_rng = np.random.default_rng([cfg.seed, epoch, rank])
        model.train()
        started, total, samples = time.perf_counter(), 0.0, 0
        for seq, pos, neg, users in training_batches(
            split.train, max_len, cfg.batch_size, batch_rng, split.n_items, share
        ):
            tensors = [torch.as_tensor(a, device=device) for a in (seq, pos, neg)]
            batch_teacher = teacher.batch(users, device) if teacher else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = step_module(*tensors, teacher=batch_teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            total += float(loss.detach()) * len(seq)
            samples += len(seq)
        seconds = time.perf_counter() - started
        result = EpochResult(epoch + 1, total / max(samples, 1), samples * world / seconds, seconds)
        if average and epoch + 1 >= cfg.swa_start:
            average.update(model)
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            judged = model
            if average and average.count:
                evaluated.load_state_dict(average.mean)
                judged = evaluated
            judged.eval()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                metrics = evaluate_next_item(
                    scorer(judged),
                    split,
                    "valid",
                    max_len,
                    max_users=cfg.eval_users,
                    seed=cfg.seed,
                    device=str(device),
                )
            result.valid = {k: v for k, v in metrics.items() if not k.startswith("_")}
            if result.valid["ndcg@10"] > best_metric:
                best_metric, since_best = result.valid["ndcg@10"], 0
                best_state = copy.deepcopy(judged.state_dict())
            else:
                since_best += cfg.eval_every
        history.append(result)
        if rank == 0:
            valid = " ".join(f"{k} {v:.4f}" for k, v in result.valid.items() if k != "users")
            log(
                f"epoch {result.epoch:>3}  loss {result.loss:.4f}  {valid or '-':<60} "
                f"{result.samples_per_second:>9,.0f} samples/s  {seconds:.1f} s"
            )
        if on_epoch:
            on_epoch(result, model, optimizer, average)
        if since_best >= cfg.patience:
            if rank == 0:
                log(f"early stop: no better validation NDCG@10 for {since_best} epochs")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
