"""The next-item task's step in the fit loop: SASRec-style batches (every position of a user's last
``max_len`` transitions predicts the next item against a sampled negative), the model's own loss (with
distillation from teachers when given), and validation by the leave-one-out protocol (NDCG@10 with 100
sampled negatives on a seeded subset of users)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from shopsight.training.next_item.data import LeaveOneOut, training_batches
from shopsight.training.next_item.evaluate import evaluate_next_item, scorer
from shopsight.training.runtime.loop import (
    EpochResult,
    LoopConfig,
    epoch_share,
    fit,
    rank_and_world,
    to_device,
)


class NextItemStep:
    """Batches, loss and validation of a next-item model on a leave-one-out split."""

    metric, label, betas = "ndcg@10", "NDCG@10", (0.9, 0.98)

    def __init__(
        self,
        split: LeaveOneOut,
        max_len: int,
        cfg: LoopConfig,
        teachers: Sequence[nn.Module] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.split, self.max_len, self.cfg = split, max_len, cfg
        self.trainable = np.flatnonzero(np.array([len(s) >= 2 for s in split.train]))
        self.teacher = None
        if teachers:
            from shopsight.training.next_item.distill import Teacher

            started = time.perf_counter()
            self.teacher = Teacher(teachers, split, max_len, cfg.distill_weight)
            if rank_and_world()[0] == 0:
                log(
                    f"distilling from {len(teachers)} teacher(s): states of the training inputs "
                    f"({self.teacher.nbytes / 2**20:,.0f} MiB) in {time.perf_counter() - started:.1f} s"
                )

    def batches(self, epoch: int, rank: int, world: int):
        share = epoch_share(self.trainable, self.cfg.seed, epoch, rank, world)
        rng = np.random.default_rng([self.cfg.seed, epoch, rank])
        yield from training_batches(
            self.split.train, self.max_len, self.cfg.batch_size, rng, self.split.n_items, share
        )

    def loss(self, model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
        seq, pos, neg, users = batch
        teacher = self.teacher.batch(users, device) if self.teacher else None
        return model.loss(*to_device((seq, pos, neg), device), teacher=teacher)

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        metrics = evaluate_next_item(
            scorer(model),
            self.split,
            "valid",
            self.max_len,
            max_users=self.cfg.eval_users,
            seed=self.cfg.seed,
            device=str(device),
        )
        return {k: v for k, v in metrics.items() if not k.startswith("_")}


def train_next_item(
    model: nn.Module,
    split: LeaveOneOut,
    cfg: LoopConfig,
    *,
    teachers: Sequence[nn.Module] | None = None,
    log: Callable[[str], None] = print,
    **options,
) -> list[EpochResult]:
    """Fit ``model`` (with ``loss``, ``score``, ``predict``) on the split's training histories.

    ``teachers``: trained models to distil from (:mod:`shopsight.training.next_item.distill`), with
    ``cfg.distill_weight``; they score the training inputs once, before the first epoch. ``options`` go
    to :func:`~shopsight.training.runtime.loop.fit` (device, resumption, ``on_epoch``).
    """
    step = NextItemStep(split, model.cfg.max_len, cfg, teachers, log)
    return fit(model, step, cfg, log=log, **options)


def setup(config: dict, loop: LoopConfig) -> tuple[nn.Module, NextItemStep]:
    """On a Ray worker: the model and the step from the run's config (``data`` is an interaction file or
    sequence table; ``teachers``, when given, as :func:`~shopsight.training.next_item.distill.load_teachers`
    reads them)."""
    from shopsight.training.models import build_model
    from shopsight.training.next_item.data import SequenceData

    data = SequenceData.from_file(config["data"])
    split = LeaveOneOut.split(data)
    teachers = None
    if config.get("teachers"):
        from shopsight.training.next_item.distill import load_teachers

        teachers = load_teachers(config["teachers"])
        torch.manual_seed(loop.seed)  # building the teachers drew random numbers: the student starts afresh
    model = build_model(config["model"], n_items=data.n_items, **config["model_config"])
    return model, NextItemStep(split, model.cfg.max_len, loop, teachers)


__all__ = ["setup", "NextItemStep", "train_next_item"]
