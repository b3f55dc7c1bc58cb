"""The monitor's statistics: online metrics with bootstrap intervals, challenger against champion, and
feature drift.

Intervals are scipy's percentile bootstrap (``scipy.stats.bootstrap``) over the labelled answers:
``samples`` resamples, 95%, seeded. A shadow challenger answered the very requests the champion answered,
so the difference is *paired* (each resample draws answers and recomputes both models' metric on them,
as the offline gate does); a canary answered other requests, so its difference resamples the two groups
independently.

Drift compares each feature's served values with the training set's:

- PSI (population stability index) over ten bins at the reference's deciles (or its distinct values,
  when it has ten or fewer):
  ``sum((q - p) * ln(q / p))``, which is the symmetrised Kullback-Leibler divergence, computed with
  ``scipy.special.rel_entr`` (bins empty on one side get a floor of 1e-4, the usual convention). Below 0.1
  is read as stable, above 0.25 as a shift;
- the two-sample Kolmogorov-Smirnov statistic and p-value (``scipy.stats.ks_2samp``).

A number is compared as it is, a list (a history) by its length, a flag as 0/1; text is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import special, stats

from shopsight.training.runtime.metrics import expected_calibration_error

CONFIDENCE = 0.95
PSI_BINS = 10
PSI_FLOOR = 1e-4


# ------------------------------------------------------------------------------------ metrics


def ranking_values(items: pd.Series, outcome: pd.Series, k: int) -> dict[str, np.ndarray]:
    """Per answer: whether the next item is in the top ``k`` (HR) and its NDCG gain."""
    hits, gains = np.zeros(len(items)), np.zeros(len(items))
    for row, (ranked, nxt) in enumerate(zip(items, outcome, strict=True)):
        top = list(ranked[:k]) if ranked is not None else []
        if nxt in top:
            rank = top.index(nxt)
            hits[row], gains[row] = 1.0, 1.0 / np.log2(rank + 2.0)
    return {f"hr@{k}": hits, f"ndcg@{k}": gains}


def _roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


PROBABILITY_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "roc_auc": _roc_auc,
    "ece": lambda y, p: expected_calibration_error(y, p),
    "brier": lambda y, p: float(np.mean((p - y) ** 2)),
}
LOWER_IS_BETTER = {"ece", "brier"}


@dataclass
class Estimate:
    value: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}


def _interval(statistic, data: tuple, samples: int, seed: int, paired: bool = True) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of ``statistic`` (of index arrays). Resamples where the
    statistic is undefined (ROC-AUC of a resample with one class) are left out."""
    if min(len(d) for d in data) < 2:
        return float("nan"), float("nan")
    with np.errstate(all="ignore"):
        result = stats.bootstrap(
            data,
            statistic,
            n_resamples=samples,
            confidence_level=CONFIDENCE,
            method="percentile",
            paired=paired,
            vectorized=False,
            rng=np.random.default_rng(seed),
        )
    draws = np.asarray(result.bootstrap_distribution, dtype=float)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


def estimate(metric: Callable[[np.ndarray], float], n: int, samples: int, seed: int) -> Estimate:
    """``metric`` (of an index array into the answers) with its bootstrap interval."""
    value = metric(np.arange(n))
    lo, hi = _interval(metric, (np.arange(n),), samples, seed) if n else (float("nan"), float("nan"))
    return Estimate(float(value), lo, hi)


def metric_function(kind: str, name: str, columns: dict[str, np.ndarray]) -> Callable[[np.ndarray], float]:
    """The metric ``name`` of the answers at an index array, from their per-answer ``columns`` (ranking:
    the per-answer values; probability: ``y`` and ``p``)."""
    if kind == "ranking":
        values = columns[name]
        return lambda idx: float(np.mean(values[idx]))
    y, p = columns["y"], columns["p"]
    function = PROBABILITY_METRICS[name]
    return lambda idx: function(y[idx], p[idx])


def per_answer_columns(kind: str, labelled: pd.DataFrame, k: int) -> dict[str, np.ndarray]:
    if kind == "ranking":
        return ranking_values(labelled["items"], labelled["outcome"], k)
    return {
        "y": labelled["outcome"].astype(bool).to_numpy().astype(float),
        "p": labelled["probability"].to_numpy(dtype=float),
    }


def metric_names(kind: str, k: int) -> tuple[str, ...]:
    return (f"ndcg@{k}", f"hr@{k}") if kind == "ranking" else tuple(PROBABILITY_METRICS)


@dataclass
class Comparison:
    """A challenger's primary metric minus the champion's on the same window."""

    alias: str
    version: str
    champion_version: str
    metric: str
    difference: Estimate
    paired: bool
    units: int

    def as_dict(self) -> dict:
        return {
            "alias": self.alias,
            "version": self.version,
            "champion_version": self.champion_version,
            "metric": self.metric,
            "paired": self.paired,
            "units": self.units,
            **{f"difference_{k}": v for k, v in self.difference.as_dict().items()},
        }


def compare(
    kind: str,
    metric: str,
    champion: pd.DataFrame,
    challenger: pd.DataFrame,
    alias: str,
    k: int,
    samples: int,
    seed: int,
) -> Comparison:
    """Challenger minus champion on ``metric``. Answers to the same request and user pair up (a shadow);
    with no pairs (a canary), the two groups are resampled independently."""
    pairs = champion.merge(challenger, on=["request_id", "user_id"], suffixes=("_c", "_x"))
    version = str(challenger["version"].iloc[0])
    champion_version = str(champion["version"].iloc[0])
    if len(pairs):
        mine = per_answer_columns(kind, _side(pairs, "_c"), k)
        theirs = per_answer_columns(kind, _side(pairs, "_x"), k)
        of_champion, of_challenger = (
            metric_function(kind, metric, mine),
            metric_function(kind, metric, theirs),
        )

        def paired(idx):
            return of_challenger(idx) - of_champion(idx)

        n = len(pairs)
        value = paired(np.arange(n))
        lo, hi = _interval(paired, (np.arange(n),), samples, seed)
        return Comparison(alias, version, champion_version, metric, Estimate(value, lo, hi), True, n)
    of_champion = metric_function(kind, metric, per_answer_columns(kind, champion, k))
    of_challenger = metric_function(kind, metric, per_answer_columns(kind, challenger, k))

    def apart(idx_champion, idx_challenger):
        return of_challenger(idx_challenger) - of_champion(idx_champion)

    a, b = np.arange(len(champion)), np.arange(len(challenger))
    value = apart(a, b)
    lo, hi = _interval(apart, (a, b), samples, seed, paired=False)
    return Comparison(
        alias,
        version,
        champion_version,
        metric,
        Estimate(value, lo, hi),
        False,
        len(champion) + len(challenger),
    )


def _side(pairs: pd.DataFrame, suffix: str) -> pd.DataFrame:
    columns = {c: c[: -len(suffix)] for c in pairs.columns if c.endswith(suffix)}
    return pairs[list(columns)].rename(columns=columns)


# -------------------------------------------------------------------------------------- drift


@dataclass
class FeatureDrift:
    feature: str
    psi: float
    ks: float
    ks_p_value: float
    reference_rows: int
    served_rows: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "feature": self.feature,
            "psi": self.psi,
            "ks": self.ks,
            "ks_p_value": self.ks_p_value,
            "reference_rows": self.reference_rows,
            "served_rows": self.served_rows,
        }


def numeric_view(values: pd.Series) -> np.ndarray | None:
    """The numbers drift is measured on: numbers as they are, lists by their length, flags as 0/1; None
    for text."""
    present = values.dropna()
    if present.empty:
        return np.array([], dtype=float)
    first = present.iloc[0]
    if isinstance(first, list | tuple | np.ndarray):
        return np.array([len(v) for v in present], dtype=float)
    if isinstance(first, bool | np.bool_):
        return present.astype(float).to_numpy()
    if isinstance(first, int | float | np.integer | np.floating):
        numbers = pd.to_numeric(present, errors="coerce").to_numpy(dtype=float)
        return numbers[np.isfinite(numbers)]
    return None


def psi(reference: np.ndarray, served: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``served`` against ``reference``: over the reference's distinct
    values when it has at most ``bins`` of them (counts, flags), plus one bin for values it never has;
    else over bins at its quantiles (ties merged)."""
    distinct = np.unique(reference)
    if len(distinct) <= bins:
        p = np.array([*(np.sum(reference == v) for v in distinct), 0]) / len(reference)
        known = np.isin(served, distinct)
        q = np.array([*(np.sum(served == v) for v in distinct), np.sum(~known)]) / len(served)
    else:
        inner = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))[1:-1]
        p = np.bincount(np.searchsorted(inner, reference, side="right"), minlength=len(inner) + 1)
        q = np.bincount(np.searchsorted(inner, served, side="right"), minlength=len(inner) + 1)
        p, q = p / p.sum(), q / q.sum()
    p, q = np.maximum(p, PSI_FLOOR), np.maximum(q, PSI_FLOOR)
    return float(np.sum(special.rel_entr(q, p) + special.rel_entr(p, q)))


def drift(reference: pd.DataFrame, served: pd.DataFrame, features: list[str]) -> list[FeatureDrift]:
    """PSI and KS of each feature, the worst (largest PSI) first."""
    out = []
    for name in features:
        if name not in reference.columns or name not in served.columns:
            continue
        ref, cur = numeric_view(reference[name]), numeric_view(served[name])
        if ref is None or cur is None or len(ref) == 0 or len(cur) == 0:
            continue
        ks = stats.ks_2samp(ref, cur)
        out.append(
            FeatureDrift(name, psi(ref, cur), float(ks.statistic), float(ks.pvalue), len(ref), len(cur))
        )
    return sorted(out, key=lambda d: (-d.psi, -d.ks, d.feature))
