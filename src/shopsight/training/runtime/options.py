"""What a user asks of a training run, whatever the task: the options of ``shopsight train`` (and of
``jobs submit train``). Each task's ``train(settings, model, data, options, log)`` reads those that apply
to it and leaves the others; ``None`` means the task's own default."""

from __future__ import annotations

from dataclasses import dataclass, field

# here, where reading them imports no torch, for the CLI's choices (the fit loop uses them too)
LR_SCHEDULES = ("constant", "cosine", "plateau")  # see shopsight.training.runtime.loop.LearningRate
SWA_AUTO = "auto"  # swa_start: begin weight averaging where the validation curve flattens


@dataclass(frozen=True)
class TrainOptions:
    workers: int = 1
    gpus_per_worker: float = 0
    epochs: int | None = None  # the cap; None: the task's (runs end at their validation plateau anyway)
    patience: int | None = None  # epochs without a better validation metric; None: 4 validations
    batch_size: int | None = None
    lr: float | None = None
    lr_schedule: str = "constant"
    eval_every: int | None = None
    seed: int = 0
    name: str | None = None
    # sequence models (next item: None = chosen from the data, shopsight.training.next_item.defaults)
    max_len: int | None = None
    loss: str | None = None
    d_model: int | None = None
    dropout: float | None = None
    negatives: int | None = None
    swa_start: int | str = 0  # an epoch, 0 (off) or "auto"
    teachers: tuple[str, ...] = field(default_factory=tuple)
    distill_weight: float = 0.5
    # binary tasks on user snapshots
    pos_weight: float | str = "balanced"
    pretrained: str | None = None
    calibration: str = "auto"


__all__ = ["LR_SCHEDULES", "SWA_AUTO", "TrainOptions"]
