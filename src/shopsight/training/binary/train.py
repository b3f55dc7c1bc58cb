"""Train a binary model of user snapshots (the purchase or the churn task) end to end: Ray Train, MLflow
tracking, the protocol of docs/architecture.md, calibration, registration.

The data is a point-in-time training set of the task's feature service, holding the task's label; the
split is by time: the last snapshot day tests, the day before validates (early stopping, the calibration,
the decision threshold), and the days whose labels end by the validation day train (:class:`TimeSplit`).
The network's probabilities are calibrated on the validation day
(:mod:`~shopsight.training.binary.calibration`). One MLflow run (:mod:`shopsight.training.runtime.tracking`)
records the parameters, the dataset's identity (feature
service, snapshot range, content hash), per-epoch metrics, the test numbers (ranking and calibration)
beside gradient-boosted trees on the same Feast features and, on simulator data, the oracle; learning, ROC,
PR and reliability curves, an evaluation report, and the model as a pyfunc registered with the alias
``challenger`` and checked after a round trip through the registry.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shopsight.platform import Settings, ShopsightError
from shopsight.training.binary.calibration import Calibration, reliability_diagram
from shopsight.training.binary.data import SNAPSHOT, SnapshotFeatures, TimeSplit, label_of, read_training_set
from shopsight.training.binary.fit import (
    TreeBaseline,
    balanced_pos_weight,
    oracle_probabilities,
    predict_probabilities,
    threshold_report,
)
from shopsight.training.runtime.loop import LoopConfig, evaluated_weights
from shopsight.training.runtime.metrics import decile_calibration, expected_calibration_error
from shopsight.training.runtime.tracking import (
    Candidate,
    Prepared,
    TrainSummary,
    dataset_identity,
    default_run_name,
    train_prepared,
)
from shopsight.training.tasks import Task, get_task

DEFAULT_LOOP = LoopConfig(epochs=15, batch_size=256, eval_every=1, patience=4, weight_decay=1e-5)


def _pretrained(model_uri: str, model_name: str, folder: Path) -> tuple[dict, np.ndarray, Path]:
    """A registered next-item model's encoder config, item vocabulary and weights (saved in ``folder``)."""
    import mlflow

    try:
        recommender = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except Exception as exc:  # MLflow raises several kinds for a URI it cannot resolve
        raise ShopsightError(f"cannot load the pretrained model {model_uri}: {exc}") from None
    if getattr(recommender, "model_name", None) != model_name:
        raise ShopsightError(
            f"{model_uri} is a {getattr(recommender, 'model_name', 'non-next-item')} model; "
            f"a {model_name} model of user snapshots can only start from a {model_name} next-item model"
        )
    config = {k: v for k, v in asdict(recommender.model.cfg).items() if k not in ("loss", "n_negatives")}
    path = folder / "pretrained.pt"
    torch.save(recommender.model.state_dict(), path)
    return config, recommender.item_ids, path


def read_task_data(task: Task, data: Path) -> tuple[pd.DataFrame, TimeSplit]:
    """The training set of ``task`` and its time split; ShopsightError if it holds another task's label."""
    frame = read_training_set(data)
    label = label_of(frame, str(data))
    if label != task.data.label:
        raise ShopsightError(
            f"{data} is a training set of {label}; the {task.name} task learns {task.data.label} "
            f"(`shopsight features training-set --service {task.data.source}`)"
        )
    return frame, TimeSplit.of(frame, str(data))


def prepare(
    settings: Settings,
    task: Task | str,
    model_name: str,
    data: Path,
    *,
    model_config: dict | None = None,
    loop: LoopConfig | None = None,
    pos_weight: float | str = "balanced",
    pretrained: str | None = None,
    truth: Path | None = None,
    calibration: str = "auto",
    scratch: str | None = None,
) -> Prepared:
    """The training set of ``task`` read and split once on the driver, the feature transform fitted on
    its training days, for training runs.

    Args:
        pos_weight: the positives' loss weight; ``"balanced"`` = negatives per positive, 1 = unweighted.
        pretrained: a registered next-item model URI (same architecture) to start the encoder from.
        truth: the simulator's oracle of the label, reported beside the models (default: the one under
            ``data_dir/simulated/truth`` when it exists).
        calibration: ``auto`` (isotonic with enough validation rows, else Platt), ``isotonic``, ``platt``
            or ``identity`` (the network's probabilities as they are).
        scratch: a folder name under ``data_dir/ray_results`` for the pretrained weights.
    """
    from shopsight.training.binary.fit import setup
    from shopsight.training.models import build_model
    from shopsight.training.runtime.ray_train import fit_worker

    task = get_task(task) if isinstance(task, str) else task
    task.check_model(model_name)
    loop = loop or DEFAULT_LOOP
    frame, split = read_task_data(task, data)
    config = {"d_model": 64, "dropout": 0.2, **(model_config or {})}
    item_vocab, pretrained_path = None, None
    if pretrained:
        folder = Path(settings.data_dir).absolute() / "ray_results" / (scratch or default_run_name(task.name))
        folder.mkdir(parents=True, exist_ok=True)  # the driver's scratch: the workers read the weights
        encoder, vocab, pretrained_path = _pretrained(pretrained, model_name, folder)
        config = {**config, **encoder}  # the encoder's shape must be the pretrained one
        item_vocab = vocab[1:]
    features = SnapshotFeatures.fit(split.train, item_ids=item_vocab, max_len=config.get("max_len", 50))
    config.update(n_items=features.n_items, n_dense=features.n_dense, n_categories=features.n_categories)
    build_model(model_name, **config)  # a bad configuration fails here, not on the workers
    labels = split.train[task.data.label].to_numpy()
    weight = balanced_pos_weight(labels) if pos_weight == "balanced" else float(pos_weight)
    days = pd.to_datetime(frame[SNAPSHOT], utc=True).dt.date
    identity = {
        **dataset_identity(data),
        "dataset.feature_service": task.data.source,
        "dataset.snapshot_range": f"{days.min()}..{days.max()}",
    }
    truth = Path(truth or Path(settings.data_dir) / "simulated" / "truth" / task.code.ORACLE_FILE)

    def finish(state: dict, model_config: dict) -> Candidate:
        model = build_model(model_name, **model_config)
        model.load_state_dict(evaluated_weights(state))
        return evaluated_candidate(
            task, model_name, model, features, split, identity, int(state["epoch"]),
            truth=truth, calibration=calibration, seed=loop.seed,
        )  # fmt: skip

    return Prepared(
        task=task,
        model_name=model_name,
        worker=fit_worker(setup),
        config={
            "model": model_name,
            "model_config": config,
            "data": data,
            "features": asdict(features),
            "pos_weight": float(weight),
            "pretrained": str(pretrained_path) if pretrained_path else None,
        },
        identity=identity,
        params={
            "pos_weight": round(float(weight), 4),
            "pretrained": pretrained or "none",
            "calibration": calibration,
        },
        finish=finish,
        tags=split.describe(),
    )


def train_snapshot_model(
    settings: Settings,
    task: Task | str,
    model_name: str,
    data: Path,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0,
    model_config: dict | None = None,
    loop: LoopConfig | None = None,
    pos_weight: float | str = "balanced",
    pretrained: str | None = None,
    truth: Path | None = None,
    calibration: str = "auto",
    run_name: str | None = None,
    registered_model: str | None = None,
    log=print,
) -> TrainSummary:
    """Train, calibrate, evaluate beside the baselines, log and register a model of ``task`` (the
    options: see :func:`prepare`)."""
    task = get_task(task) if isinstance(task, str) else task
    loop = loop or DEFAULT_LOOP
    run_name = run_name or default_run_name(f"{task.name}-{model_name}")
    prepared = prepare(
        settings, task, model_name, data, model_config=model_config, loop=loop, pos_weight=pos_weight,
        pretrained=pretrained, truth=truth, calibration=calibration, scratch=run_name,
    )  # fmt: skip
    return train_prepared(
        settings,
        prepared,
        loop=loop,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        run_name=run_name,
        registered_model=registered_model,
        log=log,
    )


def evaluated_candidate(
    task: Task,
    model_name: str,
    model: torch.nn.Module,
    features: SnapshotFeatures,
    split: TimeSplit,
    identity: dict[str, str],
    epoch: int,
    *,
    truth: Path,
    calibration: str = "auto",
    seed: int = 0,
) -> Candidate:
    """The trained network calibrated on the validation day and tested on the last day beside the trees
    and (when ``truth`` exists) the oracle, ready to register."""
    from shopsight.training.binary.pyfunc import SnapshotClassifier, input_example, save_model_dir

    valid, test = features.transform(split.valid), features.transform(split.test)
    raw = (predict_probabilities(model, valid), predict_probabilities(model, test))
    calibrated = Calibration.fit(raw[0], valid.labels, calibration)
    probabilities = {model_name: (calibrated(raw[0]), calibrated(raw[1]))}
    tree = TreeBaseline(seed=seed).fit(features.transform(split.train))
    probabilities["trees"] = (tree.predict(valid), tree.predict(test))
    if truth.exists():
        column = task.code.ORACLE_COLUMN
        oracle = tuple(oracle_probabilities(truth, rows, column) for rows in (valid, test))
        if not (np.isnan(oracle[0]).any() or np.isnan(oracle[1]).any()):
            probabilities["oracle"] = oracle
    reports = {
        name: threshold_report(valid.labels, v, test.labels, t) for name, (v, t) in probabilities.items()
    }
    reports[model_name]["ece_uncalibrated"] = expected_calibration_error(test.labels, raw[1])
    reports[model_name]["mean_probability_uncalibrated"] = float(np.mean(raw[1]))
    text = _report(task, model_name, reports, identity, split, epoch, calibrated.method)
    text += _decile_table(test.labels, probabilities[model_name][1], raw[1])
    tested = {name: t for name, (_, t) in probabilities.items()}
    return Candidate(
        model_name=model_name,
        metrics=reports[model_name],
        baselines={name: r for name, r in reports.items() if name != model_name},
        report=text,
        save=lambda folder: save_model_dir(folder, model_name, model, features, calibrated),
        pyfunc=SnapshotClassifier,
        example=input_example(split.test.head(5)),
        figures=lambda folder: _figures(test.labels, tested, folder),
        tags={"calibration": calibrated.method},
    )


def _figures(labels: np.ndarray, test: dict[str, np.ndarray], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4))
    for name, proba in test.items():
        fpr, tpr, _ = roc_curve(labels, proba)
        roc.plot(fpr, tpr, label=name)
        precision, recall, _ = precision_recall_curve(labels, proba)
        pr.plot(recall, precision, label=name)
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test day")
    pr.axhline(float(np.mean(labels)), color="grey", linestyle=":")
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall, test day")
    roc.legend()
    pr.legend()
    fig.tight_layout()
    fig.savefig(folder / "roc_pr_curves.png", dpi=100)
    plt.close(fig)
    reliability_diagram(labels, test, folder / "reliability.png")


def _report(
    task: Task, model_name: str, reports: dict, identity: dict, split: TimeSplit, epoch: int, method: str
) -> str:
    metrics = [("ROC-AUC", "roc_auc"), ("PR-AUC", "pr_auc"), ("log-loss", "log_loss"),
               ("Brier score", "brier"), ("ECE", "ece"), ("mean probability", "mean_probability"),
               ("precision", "precision"), ("recall", "recall"), ("F1", "f1")]  # fmt: skip
    names = list(reports)
    described = split.describe()
    lines = [
        f"# {task.name} evaluation: {model_name} (best epoch {epoch})",
        "",
        f"Label {task.data.label}: {task.description}",
        f"Data: {identity['dataset.path']} ({identity['dataset.feature_service']}, snapshots "
        f"{identity['dataset.snapshot_range']}, sha256 {identity['dataset.sha256'][:12]}).",
        f"Train {described['train']}; validation {described['valid']}; test {described['test']}"
        + (f"; left out: {described['left_out']}." if "left_out" in described else "."),
        f"{model_name}'s probabilities are calibrated on the validation day ({method}); its ECE before "
        f"calibration: {reports[model_name]['ece_uncalibrated']:.4f}. Observed rate on the test day: "
        f"{reports[model_name]['base_rate']:.4f}.",
        "Precision/recall/F1 at the threshold that maximises F1 on the validation day.",
        "",
        "| metric | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
        *[
            f"| {label} | " + " | ".join(f"{reports[n][key]:.4f}" for n in names) + " |"
            for label, key in metrics
        ],
    ]
    return "\n".join(lines) + "\n"


def _decile_table(labels: np.ndarray, calibrated: np.ndarray, raw: np.ndarray) -> str:
    predicted, observed, rows = decile_calibration(labels, calibrated)
    raw_predicted, raw_observed, _ = decile_calibration(labels, raw)
    lines = [
        "",
        "Calibration by decile of the predicted probability (test day):",
        "",
        "| decile | rows | mean predicted | observed rate | gap | uncalibrated: predicted / observed |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in range(len(predicted)):
        uncalibrated = f"{raw_predicted[k]:.4f} / {raw_observed[k]:.4f}" if k < len(raw_predicted) else "-"
        lines.append(
            f"| {k + 1} | {rows[k]:,} | {predicted[k]:.4f} | {observed[k]:.4f} | "
            f"{abs(predicted[k] - observed[k]):.4f} | {uncalibrated} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_LOOP", "evaluated_candidate", "prepare", "read_task_data", "train_snapshot_model"]
