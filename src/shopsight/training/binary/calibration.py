"""Probabilities that mean what they say: a monotone map from the network's output to the observed rate,
fitted on the validation day and saved with the model.

The network is trained with the positives' loss weighted (``pos_weight``, "balanced" by default), which
ranks well but inflates every probability: a user whose true rate is 0.2 gets about 0.9. Two maps from
scikit-learn: Platt scaling (a logistic regression on the logit: two parameters, right when the distortion
is a shift and a scale of the logit) and isotonic regression (any monotone shape, but its steps are noisy on
few rows). ``auto`` picks between them by two-fold cross-validation on the validation day (the lower log-
loss on the held-out half, summed over both folds: it punishes a confident probability that turns out wrong,
which is what miscalibrated tails are), then fits the winner on every validation row; below
``MIN_ISOTONIC_ROWS`` rows (or positives) it takes Platt without trying. The fitted map is stored as numbers
(isotonic: its thresholds, applied by linear interpolation exactly as scikit-learn predicts; Platt: slope
and intercept), not as a pickle, so the registered model needs no scikit-learn to serve.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

METHODS = ("auto", "isotonic", "platt", "identity")  # what `train --calibration` may ask for
MIN_ISOTONIC_ROWS = 1000  # scikit-learn's guidance: isotonic calibration overfits below about this
MIN_ISOTONIC_POSITIVES = 50
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


@dataclass
class Calibration:
    """A fitted map from raw probabilities to calibrated ones (``identity`` maps nothing)."""

    method: str = "identity"  # "isotonic", "platt" or "identity"
    thresholds_x: list[float] = field(default_factory=list)
    thresholds_y: list[float] = field(default_factory=list)
    slope: float = 1.0
    intercept: float = 0.0

    @classmethod
    def fit(cls, raw: np.ndarray, labels: np.ndarray, method: str = "auto") -> Calibration:
        """Fit on validation rows: ``raw`` probabilities and their 0/1 ``labels``."""
        raw, labels = np.asarray(raw, dtype=np.float64), np.asarray(labels, dtype=np.float64)
        if method == "auto":
            enough = len(raw) >= MIN_ISOTONIC_ROWS and labels.sum() >= MIN_ISOTONIC_POSITIVES
            method = _cross_validated(raw, labels) if enough else "platt"
        if method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw, labels)
            return cls(
                "isotonic",
                thresholds_x=fitted.X_thresholds_.tolist(),
                thresholds_y=fitted.y_thresholds_.tolist(),
            )
        if method == "platt":
            from sklearn.linear_model import LogisticRegression

            fitted = LogisticRegression(C=1e6).fit(_logit(raw)[:, None], labels.astype(int))
            return cls("platt", slope=float(fitted.coef_[0, 0]), intercept=float(fitted.intercept_[0]))
        if method == "identity":
            return cls()
        raise ValueError(f"unknown calibration method {method!r}: auto, isotonic, platt or identity")

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.float64)
        if self.method == "isotonic":
            return np.interp(raw, self.thresholds_x, self.thresholds_y)
        if self.method == "platt":
            return 1.0 / (1.0 + np.exp(-(self.slope * _logit(raw) + self.intercept)))
        return raw

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """The saved map; the identity when the model was saved without one."""
        return cls(**json.loads(path.read_text())) if path.exists() else cls()


def _cross_validated(raw: np.ndarray, labels: np.ndarray, seed: int = 0) -> str:
    """``isotonic`` or ``platt``, whichever has the lower held-out log-loss over two seeded folds."""
    fold = np.random.default_rng(seed).permutation(len(raw)) % 2
    scores = {}
    for method in ("platt", "isotonic"):
        total = 0.0
        for k in (0, 1):
            fitted = Calibration.fit(raw[fold != k], labels[fold != k], method)
            p = np.clip(fitted(raw[fold == k]), _EPS, 1 - _EPS)
            y = labels[fold == k]
            total -= float(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)))
        scores[method] = total
    return min(scores, key=scores.get)


def reliability_diagram(labels: np.ndarray, probabilities: dict[str, np.ndarray], path: Path) -> None:
    """Observed rate against mean predicted probability, per decile of each model's probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shopsight.training.runtime.metrics import decile_calibration

    fig, axis = plt.subplots(figsize=(5, 5))
    top = 0.0
    for name, proba in probabilities.items():
        predicted, observed, _ = decile_calibration(labels, proba)
        axis.plot(predicted, observed, marker="o", label=name)
        top = max(top, float(np.max(predicted)), float(np.max(observed)))
    axis.plot([0, top], [0, top], color="grey", linestyle=":")
    axis.set(
        xlabel="mean predicted probability (decile)", ylabel="observed rate", title="reliability, test day"
    )
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["Calibration", "reliability_diagram"]
