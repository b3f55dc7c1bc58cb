"""What a user asks of a training run, whatever the task: the options of ``shopsight train`` (and of
``jobs submit train``). Each task's ``train(settings, model, data, options, log)`` reads those that apply
to it and leaves the others; ``None`` means the task's own default."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainOptions:
    workers: int = 1
    gpus_per_worker: float = 0
    epochs: int = 20
    batch_size: int | None = None
    lr: float | None = None
    eval_every: int | None = None
    seed: int = 0
    name: str | None = None
    # sequence models
    max_len: int = 50
    loss: str = "bce"
    swa_start: int = 0
    teachers: tuple[str, ...] = field(default_factory=tuple)
    distill_weight: float = 0.5
    # binary tasks on user snapshots
    pos_weight: float | str = "balanced"
    pretrained: str | None = None
    calibration: str = "auto"


__all__ = ["TrainOptions"]
