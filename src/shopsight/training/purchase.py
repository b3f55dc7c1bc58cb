"""Purchase propensity: the plain training loop of the sequence models' purchase head, the tree baseline
on the same Feast features, and the simulator's oracle on the same rows.

The loop mirrors :mod:`shopsight.training.loop` (the next-item loop): one process as is; under
``torch.distributed`` it shards rows across ranks and wraps the model in DDP. Each epoch prints one line;
early stopping watches the validation ROC-AUC and the best weights are kept. Class imbalance is handled by
weighting the buyers' loss term (``pos_weight``: 1 = none, ``"balanced"`` = non-buyers / buyers).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from shopsight.training.loop import EpochResult, LoopConfig, _dist
from shopsight.training.metrics import binary_report
from shopsight.training.purchase_data import PurchaseTensors


class _PurchaseLossOf(nn.Module):
    """DDP synchronises gradients of what runs through forward(): so forward computes the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.model.purchase_loss(*batch)


def balanced_pos_weight(labels: np.ndarray) -> float:
    """Non-buyers per buyer: the weight that makes both classes count equally."""
    positives = float(np.sum(labels))
    return (len(labels) - positives) / max(positives, 1.0)


@torch.no_grad()
def predict_purchase(
    model: nn.Module, data: PurchaseTensors, device: str | torch.device = "cpu", batch_size: int = 2048
) -> np.ndarray:
    """Probabilities (N,) of buying tomorrow for every row of ``data``."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        tensors = [torch.as_tensor(a, device=device) for a in data.inputs(rows)]
        out.append(model.purchase_proba(*tensors).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train_purchase(
    model: nn.Module,
    train: PurchaseTensors,
    valid: PurchaseTensors,
    cfg: LoopConfig,
    *,
    pos_weight: float = 1.0,
    device: str | torch.device = "cpu",
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    on_epoch: Callable[[EpochResult, nn.Module, torch.optim.Optimizer], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[EpochResult]:
    """Train the purchase head of ``model`` (its whole network) on ``train``; validate on ``valid``.

    Returns one result per epoch run (``valid`` holds roc_auc, pr_auc, log_loss); the model ends with the
    weights of the best validation epoch.
    """
    rank, world = _dist()
    device = torch.device(device)
    model.to(device)
    step_module: nn.Module = _PurchaseLossOf(model)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    weight = torch.tensor([pos_weight], dtype=torch.float32, device=device)
    best_metric, best_state, since_best, history = -1.0, None, 0, []
    for epoch in range(start_epoch, cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        share = order[: len(order) // world * world][rank::world]
        model.train()
        started, total, samples = time.perf_counter(), 0.0, 0
        for start in range(0, len(share), cfg.batch_size):
            rows = np.sort(share[start : start + cfg.batch_size])
            tensors = [torch.as_tensor(a, device=device) for a in (*train.inputs(rows), train.labels[rows])]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = step_module(*tensors, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            total += float(loss.detach()) * len(rows)
            samples += len(rows)
        seconds = time.perf_counter() - started
        result = EpochResult(epoch + 1, total / max(samples, 1), samples * world / seconds, seconds)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            report = binary_report(valid.labels, predict_purchase(model, valid, device))
            result.valid = {k: report[k] for k in ("roc_auc", "pr_auc", "log_loss")}
            if result.valid["roc_auc"] > best_metric:
                best_metric, since_best = result.valid["roc_auc"], 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += cfg.eval_every
        history.append(result)
        if rank == 0:
            valid_text = " ".join(f"{k} {v:.4f}" for k, v in result.valid.items())
            log(
                f"epoch {result.epoch:>3}  loss {result.loss:.4f}  {valid_text or '-':<48} "
                f"{result.samples_per_second:>9,.0f} samples/s  {seconds:.1f} s"
            )
        if on_epoch:
            on_epoch(result, model, optimizer)
        if since_best >= cfg.patience:
            if rank == 0:
                log(f"early stop: no better validation ROC-AUC for {since_best} epochs")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


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

    def fit(self, train: PurchaseTensors, extra: tuple[np.ndarray, np.ndarray] | None = None) -> TreeBaseline:
        x, y = train.dense, train.labels
        if extra is not None:
            x, y = np.concatenate([x, extra[0]]), np.concatenate([y, extra[1]])
        self.model.fit(x, y.astype(int))
        return self

    def predict(self, data: PurchaseTensors) -> np.ndarray:
        return self.model.predict_proba(data.dense)[:, 1]


def oracle_probabilities(truth_path: Path | str, data: PurchaseTensors) -> np.ndarray:
    """The simulator's true next-day buy probability of each row (user, snapshot day); NaN if unknown."""
    truth = pd.read_parquet(truth_path, columns=["user_id", "day", "p_buy_next_day"])
    truth["day"] = pd.to_datetime(truth["day"].astype(str)).to_numpy("datetime64[D]")
    rows = pd.DataFrame({"user_id": data.user_ids, "day": data.days})
    return rows.merge(truth, on=["user_id", "day"], how="left")["p_buy_next_day"].to_numpy()


def purchase_report(
    valid_labels: np.ndarray, valid_proba: np.ndarray, test_labels: np.ndarray, test_proba: np.ndarray
) -> dict[str, float]:
    """The purchase protocol on the test day: ROC-AUC, PR-AUC, log-loss, and precision/recall/F1 at the
    threshold that maximises F1 on the validation day (chosen before looking at the test day)."""
    threshold = binary_report(valid_labels, valid_proba)["threshold"]
    return binary_report(test_labels, test_proba, threshold=threshold)


__all__ = [
    "TreeBaseline",
    "balanced_pos_weight",
    "oracle_probabilities",
    "predict_purchase",
    "purchase_report",
    "train_purchase",
]
