"""Evaluation metrics of the protocols in docs/architecture.md, as plain functions of numpy arrays.

Next-item ranking: the rank of the true item among candidates (0 = first). With ``k`` = 10,
``HR@k`` = share of users whose true item ranks in the top k, ``NDCG@k`` = mean of 1 / log2(rank + 2)
over those (a single relevant item, so the ideal DCG is 1). The SASRec paper ranks the true item among
itself and 100 items sampled uniformly from those the user never interacted with; full ranking ranks it
among all items but the user's other ones.

Probabilities (purchase, churn): ROC-AUC, PR-AUC (average precision), log-loss, precision / recall / F1 at a
threshold, and calibration: the Brier score and the expected calibration error (ECE).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "binary_report",
    "decile_calibration",
    "expected_calibration_error",
    "hit_rate",
    "ndcg",
    "rank_of_target",
]


def rank_of_target(scores: np.ndarray, target_index: int | np.ndarray = 0) -> np.ndarray:
    """0-based rank of each row's target among its candidates; ties count against the target.

    Args:
        scores: (users, candidates) scores, higher is better.
        target_index: the target's column (default 0: the true item first, then the negatives).
    """
    scores = np.asarray(scores, dtype=np.float64)
    rows = np.arange(scores.shape[0])
    target = scores[rows, np.broadcast_to(target_index, rows.shape)]
    # a tie is not a win: a model that scores everything equal must not look perfect
    return (scores >= target[:, None]).sum(axis=1) - 1


def hit_rate(ranks: np.ndarray, k: int = 10) -> float:
    """Share of ranks below ``k``."""
    ranks = np.asarray(ranks)
    return float((ranks < k).mean()) if ranks.size else float("nan")


def ndcg(ranks: np.ndarray, k: int = 10) -> float:
    """Mean of 1/log2(rank+2) for ranks below ``k``, 0 otherwise (one relevant item per user)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return float("nan")
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean())


def binary_report(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float | None = None
) -> dict[str, float]:
    """ROC-AUC, PR-AUC, log-loss, base rate, and precision/recall/F1 at ``threshold``.

    Without a threshold, the one maximising F1 is chosen (and reported).
    """
    from sklearn.metrics import (
        average_precision_score,
        brier_score_loss,
        log_loss,
        precision_recall_curve,
        roc_auc_score,
    )

    y = np.asarray(labels).astype(int)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1 - 1e-7)
    report = {"n": float(len(y)), "base_rate": float(y.mean())}
    if len(np.unique(y)) < 2:
        raise ValueError("binary_report needs both classes among the labels")
    report["roc_auc"] = float(roc_auc_score(y, p))
    report["pr_auc"] = float(average_precision_score(y, p))
    report["log_loss"] = float(log_loss(y, p))
    report["brier"] = float(brier_score_loss(y, p))
    report["ece"] = expected_calibration_error(y, p)
    report["mean_probability"] = float(p.mean())
    if threshold is None:
        precision, recall, thresholds = precision_recall_curve(y, p)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        threshold = float(thresholds[int(np.argmax(f1))])
    predicted = p >= threshold
    tp = float((predicted & (y == 1)).sum())
    precision_at = tp / max(predicted.sum(), 1)
    recall_at = tp / max((y == 1).sum(), 1)
    report["threshold"] = float(threshold)
    report["precision"] = precision_at
    report["recall"] = recall_at
    report["f1"] = 2 * precision_at * recall_at / max(precision_at + recall_at, 1e-12)
    return report


def decile_calibration(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per decile of the probabilities (equal-count bins): mean predicted probability, observed rate,
    rows. Ties are kept in one bin, so there may be fewer than 10."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    edges = np.unique(np.quantile(p, np.linspace(0, 1, 11)))
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    used = np.unique(bins)
    predicted = np.array([p[bins == b].mean() for b in used])
    observed = np.array([y[bins == b].mean() for b in used])
    rows = np.array([(bins == b).sum() for b in used])
    return predicted, observed, rows


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """ECE: the row-weighted mean gap between the mean predicted probability and the observed rate over
    ``bins`` equal-width probability bins (Naeini et al. 2015; scikit-learn has no ECE)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        chosen = which == b
        total += chosen.sum() * abs(p[chosen].mean() - y[chosen].mean())
    return float(total / max(len(y), 1))
