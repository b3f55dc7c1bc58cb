"""Evaluate a registered model with the protocol of architecture.md: a next-item model on any interaction
file (leave-one-out, sampled and full ranking), a purchase model on a training set of its feature service
(the last snapshot day, threshold from the day before)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shopsight.platform import Settings, ShopsightError
from shopsight.platform.mlflow_server import tracking_uri
from shopsight.training.evaluation import evaluate_next_item
from shopsight.training.loop import scorer
from shopsight.training.sequences import LeaveOneOut, SequenceData


def model_dir(settings: Settings, model_uri: str) -> Path:
    """The folder of a registered Shopsight pyfunc's network (config, weights, mappings)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(settings))
    try:
        return Path(mlflow.artifacts.download_artifacts(model_uri)) / "artifacts" / "model_dir"
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing model
        raise ShopsightError(f"cannot load {model_uri}: {str(exc).splitlines()[0]}") from None


def is_purchase_model(folder: Path) -> bool:
    from shopsight.training.purchase_model import FEATURES

    return (folder / FEATURES).exists()


def load_recommender(settings: Settings, model_uri: str):
    """The registered pyfunc's network and item mapping, loaded from MLflow."""
    from shopsight.training.next_item_model import NextItemRecommender

    folder = model_dir(settings, model_uri)
    if is_purchase_model(folder):
        raise ShopsightError(f"{model_uri} is a purchase model, not a next-item model")
    recommender = NextItemRecommender()
    recommender._load(folder)
    return recommender


def evaluate_model_uri(
    settings: Settings, model_uri: str, data: Path, max_users: int | None = None, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Test metrics of the model and of the popularity baseline on ``data`` (in the model's item space).

    Items the model never saw cannot be scored: interactions with them are dropped from the histories
    (and users left with fewer than 3 interactions are not evaluated).
    """
    from shopsight.training.train import Popularity

    recommender = load_recommender(settings, model_uri)
    data_seqs = SequenceData.from_file(data)
    index = recommender.index
    sequences = []
    for seq in data_seqs.sequences:
        original = data_seqs.item_ids[seq]
        sequences.append(np.array([index[int(i)] for i in original if int(i) in index], dtype=np.int64))
    split = LeaveOneOut.split(SequenceData(sequences, data_seqs.user_ids, recommender.item_ids))
    if not (split.test_target > 0).any():
        raise ShopsightError(f"{data}: no user has 3 or more interactions with items the model knows")
    max_len = recommender.max_len
    model = evaluate_next_item(
        scorer(recommender.model), split, "test", max_len, max_users=max_users, seed=seed
    )
    popular = evaluate_next_item(Popularity(split), split, "test", max_len, max_users=max_users, seed=seed)
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("_")}  # noqa: E731
    return {model_uri: strip(model), "popularity (same data)": strip(popular)}


def evaluate_purchase_uri(settings: Settings, model_uri: str, data: Path) -> dict[str, dict[str, float]]:
    """Test-day metrics of a registered purchase model and of trees fitted on the same training days."""
    from shopsight.training.purchase import TreeBaseline, predict_purchase, purchase_report
    from shopsight.training.purchase_data import TimeSplit, read_training_set
    from shopsight.training.purchase_model import PurchasePropensity

    folder = model_dir(settings, model_uri)
    if not is_purchase_model(folder):
        raise ShopsightError(
            f"{model_uri} is a next-item model; evaluate it on interactions, not a training set"
        )
    loaded = PurchasePropensity()
    loaded._load(folder)
    split = TimeSplit.of(read_training_set(data), str(data))
    features = loaded.features
    valid, test = features.transform(split.valid), features.transform(split.test)
    tree = TreeBaseline().fit(features.transform(split.train))
    model = purchase_report(
        valid.labels, predict_purchase(loaded.model, valid), test.labels, predict_purchase(loaded.model, test)
    )
    trees = purchase_report(valid.labels, tree.predict(valid), test.labels, tree.predict(test))
    return {model_uri: model, "trees (same training days)": trees}
