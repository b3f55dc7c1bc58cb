"""Purchase propensity: the plain training loop of the sequence models' purchase head, the tree baseline
on the same Feast features, and the simulator's oracle on the same rows.

The loop mirrors :mod:`shopsight.training.runtime.loop` (the next-item loop): one process as is; under
``torch.distributed`` it shards rows across ranks and wraps the model in DDP. Each epoch prints one line;
early stopping watches the validation ROC-AUC and the best weights are kept. Class imbalance is handled by
weighting the buyers' loss term (``pos_weight``: 1 = none, ``"balanced"`` = non-buyers / buyers).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from shopsight.training.binary.features import SnapshotTensors, predict_probabilities
from shopsight.training.runtime.loop import EpochResult, LoopConfig, epoch_share, fit, to_device
from shopsight.training.runtime.metrics import binary_report


def balanced_pos_weight(labels: np.ndarray) -> float:
    """Non-buyers per buyer: the weight that makes both classes count equally."""
    positives = float(np.sum(labels))
    return (len(labels) - positives) / max(positives, 1.0)


class BinaryStep:
    """Batches, loss and validation of a binary head on user snapshots: rows in a seeded order, the
    weighted binary cross-entropy (``pos_weight`` on the positives' term), validation ROC-AUC."""

    metric, label, betas = "roc_auc", "ROC-AUC", (0.9, 0.999)

    def __init__(
        self, train: SnapshotTensors, valid: SnapshotTensors, cfg: LoopConfig, pos_weight: float = 1.0
    ) -> None:
        self.train, self.valid, self.cfg = train, valid, cfg
        self.pos_weight = torch.tensor([pos_weight], dtype=torch.float32)

    def batches(self, epoch: int, rank: int, world: int):
        share = epoch_share(np.arange(len(self.train)), self.cfg.seed, epoch, rank, world)
        for start in range(0, len(share), self.cfg.batch_size):
            rows = np.sort(share[start : start + self.cfg.batch_size])
            yield (*self.train.inputs(rows), self.train.labels[rows])

    def loss(self, model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
        return model.user_loss(*to_device(batch, device), self.pos_weight.to(device))

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        report = binary_report(self.valid.labels, predict_probabilities(model, self.valid, device))
        return {k: report[k] for k in ("roc_auc", "pr_auc", "log_loss")}


def train_binary(
    model: nn.Module,
    train: SnapshotTensors,
    valid: SnapshotTensors,
    cfg: LoopConfig,
    *,
    pos_weight: float = 1.0,
    log: Callable[[str], None] = print,
    **options,
) -> list[EpochResult]:
    """Fit the binary head of ``model`` (its whole network) on ``train``; validate on ``valid``.

    Returns one result per epoch run (``valid`` holds roc_auc, pr_auc, log_loss); the model ends with the
    weights of the best validation epoch. ``options`` go to :func:`~shopsight.training.runtime.loop.fit`.
    """
    return fit(model, BinaryStep(train, valid, cfg, pos_weight), cfg, log=log, **options)


class TreeBaseline:
    """Gradient-boosted trees on the dense Feast features (no sequence): the seed's tree model.

    ``class_weight="balanced"`` weights buyers like :func:`balanced_pos_weight`; ``extra`` rows (dense
    features, labels) are appended to the training rows, e.g. GAN-synthesised buyers (oversampling).
    """

    def __init__(self, class_weight: str | None = None, seed: int = 0) -> None:
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.model = HistGradientBoostingClassifier(
            max_iter=400,
            learning_rate=0.05,
            max_leaf_nodes=31,
            l2_regularization=1.0,
            early_stopping=True,
            validation_fraction=0.15,
            n_iter_no_change=30,
            class_weight=class_weight,
            random_state=seed,
        )

    def fit(self, train: SnapshotTensors, extra: tuple[np.ndarray, np.ndarray] | None = None) -> TreeBaseline:
        x, y = train.dense, train.labels
        if extra is not None:
            x, y = np.concatenate([x, extra[0]]), np.concatenate([y, extra[1]])
        self.model.fit(x, y.astype(int))
        return self

    def predict(self, data: SnapshotTensors) -> np.ndarray:
        return self.model.predict_proba(data.dense)[:, 1]


def oracle_probabilities(truth_path: Path | str, data: SnapshotTensors, column: str) -> np.ndarray:
    """The simulator's true next-day buy probability of each row (user, snapshot day); NaN if unknown."""
    truth = pd.read_parquet(truth_path, columns=["user_id", "day", column])
    truth["day"] = pd.to_datetime(truth["day"].astype(str)).to_numpy("datetime64[D]")
    rows = pd.DataFrame({"user_id": data.user_ids, "day": data.days})
    return rows.merge(truth, on=["user_id", "day"], how="left")[column].to_numpy()


def threshold_report(
    valid_labels: np.ndarray, valid_proba: np.ndarray, test_labels: np.ndarray, test_proba: np.ndarray
) -> dict[str, float]:
    """The purchase protocol on the test day: ROC-AUC, PR-AUC, log-loss, and precision/recall/F1 at the
    threshold that maximises F1 on the validation day (chosen before looking at the test day)."""
    threshold = binary_report(valid_labels, valid_proba)["threshold"]
    return binary_report(test_labels, test_proba, threshold=threshold)


def setup(config: dict, loop: LoopConfig) -> tuple[nn.Module, BinaryStep]:
    """On a Ray worker: the model and the step from the run's config: ``data`` is a training set,
    ``features`` the transform fitted once on the driver (every rank the same), ``label``, ``pos_weight``
    and an optional ``pretrained`` weights file (overwritten by a checkpoint when the run resumes)."""
    from shopsight.training.binary.data import SnapshotFeatures, TimeSplit, read_training_set
    from shopsight.training.models import build_model, transfer_pretrained

    split = TimeSplit.of(read_training_set(config["data"]))
    features = SnapshotFeatures(**config["features"])
    train, valid = features.transform(split.train), features.transform(split.valid)
    model = build_model(config["model"], **config["model_config"])
    if config.get("pretrained"):
        transfer_pretrained(model, torch.load(config["pretrained"], weights_only=True))
    return model, BinaryStep(train, valid, loop, config.get("pos_weight", 1.0))


__all__ = [
    "setup",
    "TreeBaseline",
    "balanced_pos_weight",
    "oracle_probabilities",
    "predict_probabilities",
    "threshold_report",
    "BinaryStep",
    "train_binary",
]
