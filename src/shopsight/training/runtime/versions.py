"""A registered version judged on a frozen evaluation set: what each task's ``evaluate_version`` returns
to the promotion gate (:mod:`shopsight.lifecycle.promotion`), and the helpers they share.

Every task checks the same three things before any metric (a model that fails one would fail every
request, so no ``--force`` overrides them): it ``loads`` as serving loads it, its ``inputs`` are fields of
the feature service serving reads, and it predicts ``finite`` values, offline and through the pyfunc.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shopsight.platform import Settings, ShopsightError

FINITE_SAMPLE = 512  # rows sent through the pyfunc itself, as serving calls it


@dataclass
class Evaluation:
    """One version on the frozen evaluation set: the gate's checks, its metrics, its per-unit values."""

    version: str
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)  # loads/inputs/finite -> (ok, why)
    metrics: dict[str, float] = field(default_factory=dict)
    units: np.ndarray | None = None  # what the protocol scores, paired between versions (users, rows)
    values: np.ndarray | None = None  # per unit: what the paired difference is computed from
    labels: np.ndarray | None = None  # per unit, for tasks whose metric needs them
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.checks.values())

    def failures(self) -> list[str]:
        return [f"{name}: {why}" for name, (ok, why) in self.checks.items() if not ok]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def load_version(model_uri: str, expected: type) -> tuple[object, object | None, tuple[bool, str]]:
    """The pyfunc as serving loads it, the task's model inside it, and the ``loads`` check."""
    import mlflow

    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow and torch raise many kinds for a broken model
        return None, None, (False, first_line(exc))
    model = loaded.unwrap_python_model()
    if not isinstance(model, expected):
        return loaded, None, (False, f"a {type(model).__name__}, not a {expected.__name__}")
    return loaded, model, (True, "")


def service_fields(settings: Settings, service_name: str) -> set[str]:
    """The fields of a feature service as the repository defines it (no running store needed)."""
    from feast import FeatureService

    from shopsight.features.definitions import repository

    for obj in repository(settings):
        if isinstance(obj, FeatureService) and obj.name == service_name:
            return {f.name for p in obj.feature_view_projections for f in p.features}
    raise ShopsightError(f"the feature service {service_name} is not defined")


def paired_bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, samples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """The observed ``statistic`` (a function of unit indices) and its 95% percentile interval.

    Returns ``mean`` (the statistic on all units), ``lo``, ``hi`` and ``units``. Resamples where the
    statistic is undefined (NaN: one class only) are skipped.
    """
    rng = np.random.default_rng(seed)
    observed = statistic(np.arange(n))
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(samples)])
    draws = draws[np.isfinite(draws)]
    lo, hi = np.percentile(draws, [2.5, 97.5]) if len(draws) else (float("nan"), float("nan"))
    return {"mean": float(observed), "lo": float(lo), "hi": float(hi), "units": float(n)}


__all__ = [
    "FINITE_SAMPLE",
    "Evaluation",
    "first_line",
    "load_version",
    "paired_bootstrap",
    "service_fields",
]
