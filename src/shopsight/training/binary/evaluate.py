"""A registered model of user snapshots evaluated with the protocol of docs/architecture.md: the last
snapshot day of a training set, the decision threshold from the day before, beside trees fitted on the same
training days."""

from __future__ import annotations

from pathlib import Path

from shopsight.platform import Settings, ShopsightError
from shopsight.training.runtime.tracking import model_dir


def evaluate_snapshot_model_uri(
    settings: Settings, model_uri: str, data: Path
) -> dict[str, dict[str, float]]:
    """Test-day metrics of a registered purchase model and of trees fitted on the same training days."""
    from shopsight.training.binary.data import TimeSplit, read_training_set
    from shopsight.training.binary.fit import TreeBaseline, predict_probabilities, threshold_report
    from shopsight.training.binary.pyfunc import FEATURES, SnapshotClassifier

    folder = model_dir(settings, model_uri)
    if not (folder / FEATURES).exists():
        raise ShopsightError(
            f"{model_uri} is a next-item model; evaluate it on interactions, not a training set"
        )
    loaded = SnapshotClassifier.from_folder(folder)
    split = TimeSplit.of(read_training_set(data), str(data))
    features = loaded.features
    valid, test = features.transform(split.valid), features.transform(split.test)
    tree = TreeBaseline().fit(features.transform(split.train))
    model = threshold_report(
        valid.labels,
        predict_probabilities(loaded.model, valid),
        test.labels,
        predict_probabilities(loaded.model, test),
    )
    trees = threshold_report(valid.labels, tree.predict(valid), test.labels, tree.predict(test))
    return {model_uri: model, "trees (same training days)": trees}


def evaluate_version(settings: Settings, task, model_uri: str, version: str, data: Path, seed: int):
    """The gate's checks and the protocol (last snapshot day, calibrated probabilities as served) of a
    registered model of ``task``."""
    import time

    import numpy as np

    from shopsight.training.binary.data import SEQUENCE_COLUMNS
    from shopsight.training.binary.fit import predict_probabilities, threshold_report
    from shopsight.training.binary.pyfunc import SnapshotClassifier, input_example
    from shopsight.training.binary.train import read_task_data
    from shopsight.training.runtime.versions import FINITE_SAMPLE, Evaluation, load_version, service_fields

    started = time.perf_counter()
    result = Evaluation(version)
    loaded, model, loads = load_version(model_uri, SnapshotClassifier)
    if model is None:
        result.checks["loads"] = loads
        return result
    result.checks["loads"] = (True, f"{model.model_name}, {model.features.n_dense} dense inputs")
    features = model.features
    needed = [*features.dense_columns, *features.never_columns, *SEQUENCE_COLUMNS, "segment_id"]
    service = task.route.service
    missing = sorted({c for c in needed if c not in service_fields(settings, service)})
    result.checks["inputs"] = (
        (False, f"feature column(s) {', '.join(missing)} are not fields of {service}")
        if missing
        else (True, f"{len(set(needed))} columns, all fields of {service}")
    )
    if missing:
        return result  # transforming the rows would fail on the same columns
    _, split = read_task_data(task, data)
    valid, test = features.transform(split.valid), features.transform(split.test)
    valid_p = model.calibration(predict_probabilities(model.model, valid))
    test_p = model.calibration(predict_probabilities(model.model, test))
    served = loaded.predict(input_example(split.test.head(FINITE_SAMPLE)))["probability"].to_numpy()
    finite = bool(np.isfinite(valid_p).all() and np.isfinite(test_p).all() and np.isfinite(served).all())
    result.checks["finite"] = (
        finite,
        f"every probability of {len(test):,} rows finite" if finite else "non-finite probabilities",
    )
    if finite:
        result.metrics = threshold_report(valid.labels, valid_p, test.labels, test_p)
    result.units = np.arange(len(test))
    result.values, result.labels = test_p.astype(np.float64), test.labels.astype(int)
    result.seconds = time.perf_counter() - started
    return result


def paired_difference(candidate, champion):
    """Candidate minus champion: ROC-AUC on the same test rows, as a statistic of resampled row indices
    (NaN where a resample holds one class), and the number of rows."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    labels, cand, champ = candidate.labels, candidate.values, champion.values
    if len(cand) != len(champ) or not np.array_equal(labels, champion.labels):
        raise ShopsightError("candidate and champion were evaluated on different rows")

    def statistic(idx: np.ndarray) -> float:
        if len(np.unique(labels[idx])) < 2:
            return float("nan")
        return float(roc_auc_score(labels[idx], cand[idx]) - roc_auc_score(labels[idx], champ[idx]))

    return statistic, len(cand)
