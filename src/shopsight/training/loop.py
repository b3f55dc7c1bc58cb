"""The plain PyTorch training loop for next-item models. It runs in one process as is; under
``torch.distributed`` (torchrun, or Ray Train's TorchTrainer) it shards users across ranks and wraps the
model in DistributedDataParallel. Ray only wraps this loop; it never replaces it.

Each epoch prints one line: loss, validation metric, samples/s, seconds. Early stopping watches the
validation NDCG@10 (sampled protocol); the best weights are kept.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
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


@dataclass
class EpochResult:
    epoch: int
    loss: float
    samples_per_second: float
    seconds: float
    valid: dict[str, float] = field(default_factory=dict)


class _LossOf(nn.Module):
    """DDP synchronises gradients of what runs through forward(): so forward computes the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.model.loss(*batch)


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
    on_epoch: Callable[[EpochResult, nn.Module, torch.optim.Optimizer], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[EpochResult]:
    """Train ``model`` (with ``loss``, ``score``, ``predict``) on the split's training histories.

    Args:
        start_epoch: resume from this epoch (with ``optimizer_state`` from a checkpoint).
        on_epoch: called after every epoch (checkpointing, reporting); raising stops the run.

    Returns:
        One result per epoch run. The model ends with the weights of the best validation epoch.
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
        for seq, pos, neg in training_batches(
            split.train, max_len, cfg.batch_size, batch_rng, split.n_items, share
        ):
            tensors = [torch.as_tensor(a, device=device) for a in (seq, pos, neg)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = step_module(*tensors)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            total += float(loss.detach()) * len(seq)
            samples += len(seq)
        seconds = time.perf_counter() - started
        result = EpochResult(epoch + 1, total / max(samples, 1), samples * world / seconds, seconds)
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            model.eval()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                metrics = evaluate_next_item(
                    scorer(model),
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
                best_state = copy.deepcopy(model.state_dict())
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
            on_epoch(result, model, optimizer)
        if since_best >= cfg.patience:
            if rank == 0:
                log(f"early stop: no better validation NDCG@10 for {since_best} epochs")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
