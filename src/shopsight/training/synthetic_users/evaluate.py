"""Quality of synthetic tabular data as plain functions of pandas frames (the GAN protocol of
docs/architecture.md).

* Utility: TSTR / TRTR. The same classifier (scikit-learn's HistGradientBoostingClassifier, fixed seed)
  is trained once on real training rows (TRTR) and once on synthetic rows (TSTR); both are scored by
  ROC-AUC on the same real held-out rows. A ratio near 1 means the synthetic rows teach a model as much
  as the real ones.
* Fidelity, per column: numeric columns by the two-sample Kolmogorov-Smirnov statistic (largest gap
  between the two empirical CDFs, 0..1) and the 1-Wasserstein distance of the values standardised by the
  real column's mean and standard deviation (in real standard deviations); categorical columns by the
  total variation distance (half the L1 distance between the two category distributions, 0..1). A numeric
  column with missing values is compared on its present values, and its missing share as a category
  (``"<column> is missing"``: the TVD of present/missing, the gap between the two shares).
* Fidelity, jointly: the absolute difference of the Pearson correlation matrices over numeric columns,
  mean and largest over the pairs.
* Privacy: distance to closest record (DCR). For each synthetic row, the distance to its nearest real
  training row; the same for real held-out rows, which were never trained on, as the baseline. Rows
  are compared after scaling (numeric columns standardised by the real training rows, categorical
  columns one-hot scaled so that a mismatch counts as one standard deviation). A generator that copies
  training rows has synthetic DCRs well below the holdout's; a ratio near 1 means synthetic rows are
  no closer to the training rows than new real rows are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from shopsight.platform import ShopsightError

__all__ = [
    "column_distances",
    "correlation_difference",
    "distance_to_closest_record",
    "synthetic_report",
    "total_variation_distance",
    "tstr_ratio",
]


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ShopsightError(f"{what} lacks column(s) {', '.join(map(repr, missing))}")


def _binary_labels(values: pd.Series, positive, what: str) -> np.ndarray:
    y = (values.to_numpy() == positive).astype(int)
    if y.min() == y.max():
        raise ShopsightError(f"{what} has only one class of {values.name!r}; ROC-AUC needs both")
    return y


def _floats(column: pd.Series) -> np.ndarray:
    """A numeric column as float64, missing values (NaN, None, pd.NA) as NaN."""
    return column.to_numpy(dtype=np.float64, na_value=np.nan)


def _design(
    frame: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str], levels: dict
) -> np.ndarray:
    """Numeric columns as floats, categorical ones as codes of the real training levels (NaN if unseen)."""
    parts = [_floats(frame[c]) for c in numeric]  # missing stay NaN: the trees route them on their own
    for c in categorical:
        codes = pd.Categorical(frame[c], categories=levels[c]).codes.astype(np.float64)
        parts.append(np.where(codes < 0, np.nan, codes))
    return np.column_stack(parts) if parts else np.empty((len(frame), 0))


def tstr_ratio(
    real_train: pd.DataFrame,
    synthetic: pd.DataFrame,
    real_test: pd.DataFrame,
    label: str,
    features: Sequence[str],
    *,
    categorical: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, float]:
    """Train on synthetic, test on real, over train on real, test on real (ROC-AUC of the same classifier).

    Args:
        real_train: real rows the generator was trained on.
        synthetic: generated rows, with the same columns.
        real_test: real rows neither saw.
        label: the binary target column; its positive class is the larger of the real training values
            (True for a boolean label).
        features: the classifier's input columns; those also in ``categorical`` are treated as
            categories (native categorical splits), the others as numbers.
        categorical: which of ``features`` are categorical.
        seed: the classifier's random state.

    Returns:
        ``tstr_auc``, ``trtr_auc`` and ``ratio`` = tstr_auc / trtr_auc.

    Raises:
        ShopsightError: a missing column, or a frame with a single class.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    features = list(features)
    cats = [c for c in features if c in set(categorical)]
    nums = [c for c in features if c not in set(categorical)]
    for frame, what in ((real_train, "real_train"), (synthetic, "synthetic"), (real_test, "real_test")):
        _require_columns(frame, [*features, label], what)
    positive = np.sort(real_train[label].dropna().unique())[-1]
    levels = {c: np.sort(real_train[c].dropna().unique()) for c in cats}
    x_test = _design(real_test, nums, cats, levels)
    y_test = _binary_labels(real_test[label], positive, "real_test")
    mask = [False] * len(nums) + [True] * len(cats)

    def auc(train: pd.DataFrame, what: str) -> float:
        model = HistGradientBoostingClassifier(random_state=seed, categorical_features=mask if cats else None)
        model.fit(_design(train, nums, cats, levels), _binary_labels(train[label], positive, what))
        return float(roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]))

    trtr = auc(real_train, "real_train")
    tstr = auc(synthetic, "synthetic")
    return {"tstr_auc": tstr, "trtr_auc": trtr, "ratio": tstr / trtr}


def total_variation_distance(real: Sequence, synthetic: Sequence) -> float:
    """Half the L1 distance between the category frequencies of two samples (0 = same, 1 = disjoint)."""
    p = pd.Series(real).value_counts(normalize=True)
    q = pd.Series(synthetic).value_counts(normalize=True)
    both = p.index.union(q.index)
    return float(0.5 * np.abs(p.reindex(both, fill_value=0.0) - q.reindex(both, fill_value=0.0)).sum())


def column_distances(
    real: pd.DataFrame, synthetic: pd.DataFrame, numeric: Sequence[str] = (), categorical: Sequence[str] = ()
) -> dict[str, dict[str, float]]:
    """Distance between the real and synthetic distribution of each column.

    Returns:
        per column: numeric ``{"ks": ..., "wasserstein": ...}`` (Wasserstein in real standard
        deviations), categorical ``{"tvd": ...}``; and under ``"mean"`` the mean of each measure.

    Raises:
        ShopsightError: a missing column or an empty frame.
    """
    from scipy.stats import ks_2samp, wasserstein_distance

    for frame, what in ((real, "real"), (synthetic, "synthetic")):
        _require_columns(frame, [*numeric, *categorical], what)
        if frame.empty:
            raise ShopsightError(f"the {what} frame is empty")
    out: dict[str, dict[str, float]] = {}
    for c in numeric:
        r, s = _floats(real[c]), _floats(synthetic[c])
        r_missing, s_missing = np.isnan(r), np.isnan(s)
        if r_missing.any() or s_missing.any():
            # whether a value is missing is a binary category: its TVD is the gap between the shares
            out[f"{c} is missing"] = {"tvd": float(abs(r_missing.mean() - s_missing.mean()))}
            r, s = r[~r_missing], s[~s_missing]
        if len(r) == 0 or len(s) == 0:
            continue  # no values on one side: the missing shares above say all there is
        scale = r.std() or 1.0  # a constant real column: distances in its own units
        out[c] = {
            "ks": float(ks_2samp(r, s).statistic),
            "wasserstein": float(wasserstein_distance((r - r.mean()) / scale, (s - r.mean()) / scale)),
        }
    for c in categorical:
        out[c] = {"tvd": total_variation_distance(real[c], synthetic[c])}
    means = {}
    for measure in ("ks", "wasserstein", "tvd"):
        values = [d[measure] for d in out.values() if measure in d]
        if values:
            means[measure] = float(np.mean(values))
    out["mean"] = means
    return out


def correlation_difference(
    real: pd.DataFrame, synthetic: pd.DataFrame, numeric: Sequence[str]
) -> dict[str, float]:
    """Mean and largest absolute difference of the Pearson correlations over pairs of numeric columns.

    A constant column has no correlation; it counts as 0 on both sides.

    Raises:
        ShopsightError: fewer than two columns, or a missing column.
    """
    numeric = list(numeric)
    if len(numeric) < 2:
        raise ShopsightError("correlation_difference needs at least two numeric columns")
    for frame, what in ((real, "real"), (synthetic, "synthetic")):
        _require_columns(frame, numeric, what)

    def corr(frame: pd.DataFrame) -> np.ndarray:
        # pairwise over the rows where both values are present (missing values are allowed)
        matrix = frame[numeric].astype(np.float64).corr().to_numpy()
        return np.nan_to_num(matrix, nan=0.0)

    upper = np.triu_indices(len(numeric), k=1)
    diff = np.abs(corr(real) - corr(synthetic))[upper]  # (pairs,)
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}


class _Scaler:
    """Real training rows' scaling for distances: z-scores, and one-hot categories weighted 1/sqrt(2).

    A missing numeric value counts as the real column's median plus a "missing" indicator worth one
    standard deviation, so a missing value differs from a present one by at least one unit.
    """

    def __init__(self, frame: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str]) -> None:
        self.numeric, self.categorical = list(numeric), list(categorical)
        values = self._values(frame)
        with np.errstate(all="ignore"):
            self.fill = np.nan_to_num(np.nanmedian(values, axis=0)) if values.size else np.zeros(0)
        values = np.where(np.isnan(values), self.fill, values)
        self.mean = values.mean(axis=0)
        self.std = np.where(values.std(axis=0) > 0, values.std(axis=0), 1.0)
        self.levels = {c: np.sort(frame[c].dropna().unique()) for c in self.categorical}

    def _values(self, frame: pd.DataFrame) -> np.ndarray:
        return (
            np.column_stack([_floats(frame[c]) for c in self.numeric])
            if self.numeric
            else np.empty((len(frame), 0))
        )

    def __call__(self, frame: pd.DataFrame) -> np.ndarray:
        values = self._values(frame)
        missing = np.isnan(values)
        parts = [(np.where(missing, self.fill, values) - self.mean) / self.std, missing.astype(np.float64)]
        for c in self.categorical:
            codes = pd.Categorical(frame[c], categories=self.levels[c]).codes
            onehot = np.zeros((len(frame), len(self.levels[c])))
            seen = codes >= 0
            onehot[np.flatnonzero(seen), codes[seen]] = 1.0
            # two one-hot rows that differ are sqrt(2) apart; scaled, a mismatch weighs one unit
            parts.append(onehot / np.sqrt(2.0))
        return np.hstack(parts)  # (rows, numeric + sum of levels)


def _nearest(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=1).fit(reference)
    return index.kneighbors(queries, return_distance=True)[0][:, 0]


def distance_to_closest_record(
    real_train: pd.DataFrame,
    synthetic: pd.DataFrame,
    real_holdout: pd.DataFrame,
    numeric: Sequence[str] = (),
    categorical: Sequence[str] = (),
    *,
    max_rows: int | None = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Euclidean distance from each synthetic and each real holdout row to its nearest real training row.

    Args:
        real_train: the rows the generator was trained on.
        synthetic: generated rows.
        real_holdout: real rows the generator never saw: the baseline.
        numeric, categorical: the compared columns.
        max_rows: synthetic and holdout rows are each subsampled (with ``seed``) to at most this many,
            and to the same number, so their percentiles compare like with like; None keeps all.

    Returns:
        ``synthetic_median``, ``synthetic_p05``, ``holdout_median``, ``holdout_p05``, ``median_ratio``
        and ``p05_ratio`` (synthetic over holdout; NaN where the holdout's is 0), and
        ``synthetic_exact_share`` / ``holdout_exact_share``, the shares at distance 0 (identical rows).

    Raises:
        ShopsightError: a missing column, no columns, or an empty frame.
    """
    if not numeric and not categorical:
        raise ShopsightError("distance_to_closest_record needs at least one column")
    for frame, what in ((real_train, "real_train"), (synthetic, "synthetic"), (real_holdout, "real_holdout")):
        _require_columns(frame, [*numeric, *categorical], what)
        if frame.empty:
            raise ShopsightError(f"the {what} frame is empty")
    n = min(len(synthetic), len(real_holdout))
    if max_rows is not None:
        n = min(n, max_rows)
    synthetic = synthetic.sample(n, random_state=seed) if len(synthetic) > n else synthetic
    real_holdout = real_holdout.sample(n, random_state=seed) if len(real_holdout) > n else real_holdout
    scale = _Scaler(real_train, numeric, categorical)
    reference = scale(real_train)
    syn = _nearest(reference, scale(synthetic))
    hold = _nearest(reference, scale(real_holdout))

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    out = {
        "synthetic_median": float(np.median(syn)),
        "synthetic_p05": float(np.percentile(syn, 5)),
        "holdout_median": float(np.median(hold)),
        "holdout_p05": float(np.percentile(hold, 5)),
        "synthetic_exact_share": float((syn == 0).mean()),
        "holdout_exact_share": float((hold == 0).mean()),
        "rows": float(n),
    }
    out["median_ratio"] = ratio(out["synthetic_median"], out["holdout_median"])
    out["p05_ratio"] = ratio(out["synthetic_p05"], out["holdout_p05"])
    return out


def synthetic_report(
    real_train: pd.DataFrame,
    synthetic: pd.DataFrame,
    real_test: pd.DataFrame,
    label: str,
    numeric: Sequence[str],
    categorical: Sequence[str] = (),
    *,
    seed: int = 0,
) -> dict:
    """Every measure above for one synthetic frame: ``tstr``, ``columns``, ``correlation``, ``dcr``.

    The label is a feature of the per-column distances (as a category) but not of the correlations,
    the classifier's inputs or the DCR; the real test rows are the DCR's holdout.
    """
    features = [*numeric, *categorical]
    return {
        "tstr": tstr_ratio(
            real_train, synthetic, real_test, label, features, categorical=categorical, seed=seed
        ),
        "columns": column_distances(real_train, synthetic, numeric, [*categorical, label]),
        "correlation": correlation_difference(real_train, synthetic, numeric),
        "dcr": distance_to_closest_record(real_train, synthetic, real_test, numeric, categorical, seed=seed),
    }
