"""Train a purchase-propensity model end to end: Ray Train, MLflow tracking, the purchase protocol,
registration.

The data is a point-in-time training set of the ``purchase_propensity_v1`` feature service; the split is
by time (architecture.md): earlier snapshot days train, the day before the last validates (early stopping,
the decision threshold), the last day tests. One MLflow run records the parameters, the dataset's identity
(feature service, snapshot range, content hash), per-epoch metrics, the test numbers beside gradient-boosted
trees on the same Feast features and, on simulator data, the oracle; ROC and PR curves and learning curves
as PNG, an evaluation report, and the model as a pyfunc registered with the alias ``challenger`` and
checked after a round trip through the registry.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shopsight.platform import Settings, ShopsightError
from shopsight.platform.mlflow_server import tracking_uri
from shopsight.platform.ray_cluster import storage_path
from shopsight.training.loop import LoopConfig
from shopsight.training.purchase import (
    TreeBaseline,
    balanced_pos_weight,
    oracle_probabilities,
    predict_purchase,
    purchase_report,
)
from shopsight.training.purchase_data import SNAPSHOT, PurchaseFeatures, TimeSplit, read_training_set
from shopsight.training.train import CHALLENGER, dataset_identity, mark_challenger

PURCHASE_MODEL = "shopsight-purchase"
EXPERIMENT = "purchase"
SERVICE = "purchase_propensity_v1"
SEQUENCE_MODELS = ("sasrec", "lstm")


@dataclass
class PurchaseSummary:
    run_id: str
    model_uri: str
    registered_model: str
    version: str
    test: dict[str, float]
    baselines: dict[str, dict[str, float]]  # name -> the same test numbers
    epochs: int
    seconds: float


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
            f"a {model_name} purchase model can only start from a {model_name} next-item model"
        )
    config = {k: v for k, v in asdict(recommender.model.cfg).items() if k not in ("loss", "n_negatives")}
    path = folder / "pretrained.pt"
    torch.save(recommender.model.state_dict(), path)
    return config, recommender.item_ids, path


def train_purchase_model(
    settings: Settings,
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
    run_name: str | None = None,
    registered_model: str = PURCHASE_MODEL,
    log=print,
) -> PurchaseSummary:
    """Train, evaluate beside the baselines, log and register a purchase model.

    Args:
        pos_weight: the buyers' loss weight; ``"balanced"`` = non-buyers per buyer, 1 = unweighted.
        pretrained: a registered next-item model URI (same architecture) to start the encoder from.
        truth: the simulator's ``next_day_buy`` oracle, reported beside the models (default: the one
            under ``data_dir/simulated`` when it exists).
    """
    import mlflow
    from mlflow import MlflowClient

    from shopsight.training.models import build_model
    from shopsight.training.purchase_model import input_example, log_purchase_model, save_model_dir
    from shopsight.training.ray_train import CHECKPOINT_FILE, train_with_ray

    if model_name not in SEQUENCE_MODELS:
        raise ShopsightError(
            f"unknown purchase model {model_name!r}: choose one of {', '.join(SEQUENCE_MODELS)}"
        )
    started = time.perf_counter()
    loop = loop or LoopConfig(epochs=15, batch_size=256, eval_every=1, patience=4, weight_decay=1e-5)
    frame = read_training_set(data)
    split = TimeSplit.of(frame, str(data))
    run_name = run_name or f"purchase-{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(settings.data_dir).absolute() / "ray_results"  # the driver's scratch (pretrained weights)
    (storage / run_name).mkdir(parents=True, exist_ok=True)
    config = {"d_model": 64, "dropout": 0.2, **(model_config or {})}
    item_vocab, pretrained_path = None, None
    if pretrained:
        encoder, vocab, pretrained_path = _pretrained(pretrained, model_name, storage / run_name)
        config = {**config, **encoder}  # the encoder's shape must be the pretrained one
        item_vocab = vocab[1:]
    features = PurchaseFeatures.fit(split.train, item_ids=item_vocab, max_len=config.get("max_len", 50))
    config.update(n_items=features.n_items, n_dense=features.n_dense, n_categories=features.n_categories)
    build_model(model_name, **config)  # a bad configuration fails here, not on the workers
    weight = (
        balanced_pos_weight(split.train["buy_next_1d"].to_numpy()) if pos_weight == "balanced" else pos_weight
    )
    days = pd.to_datetime(frame[SNAPSHOT], utc=True).dt.date
    identity = {
        **dataset_identity(data),
        "dataset.feature_service": SERVICE,
        "dataset.snapshot_range": f"{days.min()}..{days.max()}",
    }
    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({**identity, "model": model_name, "task": "purchase", **split.describe()})
        mlflow.log_params(
            {
                "model": model_name,
                "workers": workers,
                "gpus_per_worker": gpus_per_worker,
                "pos_weight": round(float(weight), 4),
                "pretrained": pretrained or "none",
                **{f"model.{k}": v for k, v in config.items()},
                **{f"loop.{k}": v for k, v in asdict(loop).items()},
            }
        )
        log(f"MLflow run {run.info.run_id} at {uri}")
        result = train_with_ray(
            model_name,
            data,
            name=run_name,
            storage_path=storage_path(settings),
            workers=workers,
            worker_resources=settings.ray.worker_resources,
            gpus_per_worker=gpus_per_worker,
            model_config=config,
            loop=loop,
            mlflow=(uri, run.info.run_id),
            task="purchase",
            task_config={
                "features": asdict(features),
                "pos_weight": float(weight),
                "pretrained": str(pretrained_path) if pretrained_path else None,
            },
        )
        if result.error is not None:
            raise ShopsightError(f"training failed: {result.error}")
        best = max(result.best_checkpoints, key=lambda pair: pair[1].get("valid_roc_auc", -1.0))[0]
        with best.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)
        model = build_model(model_name, **config)
        model.load_state_dict(state["model"])
        valid, test = features.transform(split.valid), features.transform(split.test)
        probabilities = {model_name: (predict_purchase(model, valid), predict_purchase(model, test))}
        tree = TreeBaseline(seed=loop.seed).fit(features.transform(split.train))
        probabilities["trees"] = (tree.predict(valid), tree.predict(test))
        truth = truth or Path(settings.data_dir) / "simulated" / "truth" / "next_day_buy.parquet"
        if Path(truth).exists():
            oracle = (oracle_probabilities(truth, valid), oracle_probabilities(truth, test))
            if not (np.isnan(oracle[0]).any() or np.isnan(oracle[1]).any()):
                probabilities["oracle"] = oracle
        reports = {
            name: purchase_report(valid.labels, v, test.labels, t) for name, (v, t) in probabilities.items()
        }
        for name, report in reports.items():
            prefix = "test" if name == model_name else name
            mlflow.log_metrics({f"{prefix}_{k}": v for k, v in report.items()})
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            _plots(
                MlflowClient(uri),
                run.info.run_id,
                test.labels,
                {n: t for n, (_, t) in probabilities.items()},
                tmp,
            )
            report_text = _report(model_name, reports, identity, split, int(state["epoch"]))
            (tmp / "evaluation.md").write_text(report_text)
            mlflow.log_artifacts(str(tmp), artifact_path="evaluation")
            folder = save_model_dir(tmp / "model_dir", model_name, model, features)
            example = input_example(split.test.head(5))
            info = log_purchase_model(folder, example, registered_name=registered_model)
            expected = predict_purchase(model, features.transform(split.test.head(5)))
        version = str(info.registered_model_version)
        mark_challenger(uri, registered_model, version, {"model": model_name, "task": "purchase", **identity})
        loaded = mlflow.pyfunc.load_model(f"models:/{registered_model}/{version}")
        if not np.allclose(loaded.predict(example)["probability"].to_numpy(), expected, atol=1e-6):
            raise ShopsightError(f"models:/{registered_model}/{version} loaded back predicts otherwise")
        log(report_text)
    return PurchaseSummary(
        run_id=run.info.run_id,
        model_uri=f"models:/{registered_model}@{CHALLENGER}",
        registered_model=registered_model,
        version=version,
        test=reports[model_name],
        baselines={name: r for name, r in reports.items() if name != model_name},
        epochs=int(state["epoch"]),
        seconds=time.perf_counter() - started,
    )


def _plots(client, run_id: str, labels: np.ndarray, test: dict[str, np.ndarray], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, axis in (("loss", left), ("valid_roc_auc", right)):
        history = client.get_metric_history(run_id, key)
        axis.plot([m.step for m in history], [m.value for m in history], marker=".")
        axis.set_xlabel("epoch")
        axis.set_title(key)
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=100)
    plt.close(fig)
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


def _report(model_name: str, reports: dict, identity: dict, split: TimeSplit, epoch: int) -> str:
    metrics = [("ROC-AUC", "roc_auc"), ("PR-AUC", "pr_auc"), ("log-loss", "log_loss"),
               ("precision", "precision"), ("recall", "recall"), ("F1", "f1")]  # fmt: skip
    names = list(reports)
    described = split.describe()
    lines = [
        f"# Purchase evaluation: {model_name} (best epoch {epoch})",
        "",
        f"Data: {identity['dataset.path']} ({identity['dataset.feature_service']}, snapshots "
        f"{identity['dataset.snapshot_range']}, sha256 {identity['dataset.sha256'][:12]}).",
        f"Train {described['train']}; validation {described['valid']}; test {described['test']}.",
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
