"""Train a next-item model end to end: Ray Train, MLflow tracking, the test protocol, registration.

One MLflow run per training run: parameters, the dataset's identity (path, content hash, users, items,
interactions), per-epoch metrics (logged live by the rank-0 worker), the test protocol (HR@10/NDCG@10,
sampled and full ranking) beside the popularity baseline, plots (learning curves, HR/NDCG by sequence
length), an evaluation report, and the model as a pyfunc registered with the alias ``challenger``.
The registered model is loaded back and must give the in-memory model's predictions.
"""

from __future__ import annotations

import hashlib
import json
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
from shopsight.training.evaluation import evaluate_next_item
from shopsight.training.loop import LoopConfig, evaluated_weights, scorer
from shopsight.training.sequences import LeaveOneOut, SequenceData

NEXT_ITEM_MODEL = "shopsight-next-item"
EXPERIMENT = "next-item"
CHALLENGER = "challenger"


@dataclass
class TrainSummary:
    run_id: str
    model_uri: str
    registered_model: str
    version: str
    test: dict[str, float]
    popularity: dict[str, float]
    epochs: int
    seconds: float


def mark_challenger(uri: str, registered_model: str, version: str, tags: dict[str, str]) -> None:
    """Point the ``challenger`` alias at a new version and tag it (model, task, the dataset's identity)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    client.set_registered_model_alias(registered_model, CHALLENGER, version)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, value)


def dataset_identity(path: Path) -> dict[str, str]:
    """Path and sha256 of the data (all files of a folder, in name order)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return {"dataset.path": str(path.absolute()), "dataset.sha256": digest.hexdigest()}


class Popularity:
    """The popularity baseline: every user gets the items most frequent in the training histories."""

    def __init__(self, split: LeaveOneOut) -> None:
        counts = np.bincount(np.concatenate(split.train), minlength=split.n_items + 1).astype(np.float32)
        counts[0] = -np.inf
        self.scores = torch.as_tensor(counts)

    def __call__(self, seqs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        if candidates is None:
            return self.scores.expand(len(seqs), -1).clone()
        return self.scores[candidates]


def train_next_item_model(
    settings: Settings,
    model_name: str,
    data: Path,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0,
    model_config: dict | None = None,
    loop: LoopConfig | None = None,
    run_name: str | None = None,
    registered_model: str = NEXT_ITEM_MODEL,
    teachers: list[str] | None = None,
    log=print,
) -> TrainSummary:
    """Train, evaluate, log and register; returns the run, the registered version and the test metrics.

    ``teachers``: registered next-item models (``models:/NAME/VERSION``) on the same item catalogue to
    distil into this one (:mod:`shopsight.training.distill`), with ``loop.distill_weight``.
    """
    import mlflow
    from mlflow import MlflowClient

    from shopsight.training.models import MODELS
    from shopsight.training.next_item_model import log_next_item_model, save_model_dir
    from shopsight.training.ray_train import CHECKPOINT_FILE, train_with_ray

    if model_name not in MODELS:
        raise ShopsightError(f"unknown model {model_name!r}: choose one of {', '.join(sorted(MODELS))}")
    started = time.perf_counter()
    loop = loop or LoopConfig()
    model_config = dict(model_config or {})
    sequences = SequenceData.from_file(data)
    split = LeaveOneOut.split(sequences)
    if not (split.test_target > 0).any():
        raise ShopsightError(f"{data}: no user has 3 or more interactions; nothing to evaluate")
    teacher_states = _load_teachers(settings, teachers or [], sequences, model_config, loop.distill_weight)
    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(EXPERIMENT)
    run_name = run_name or f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    identity = dataset_identity(data)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({**identity, "model": model_name, "task": "next-item"})
        mlflow.log_params(
            {
                "model": model_name,
                "workers": workers,
                "gpus_per_worker": gpus_per_worker,
                "users": len(sequences.sequences),
                "items": sequences.n_items,
                "interactions": sequences.n_interactions,
                **{f"model.{k}": v for k, v in model_config.items()},
                **{f"loop.{k}": v for k, v in asdict(loop).items()},
                **({"teachers": " ".join(teachers)} if teachers else {}),
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
            model_config=model_config,
            loop=loop,
            mlflow=(uri, run.info.run_id),
            task_config={"teachers": teacher_states} if teacher_states else None,
        )
        if result.error is not None:
            raise ShopsightError(f"training failed: {result.error}")
        best = max(result.best_checkpoints, key=lambda pair: pair[1].get("valid_ndcg@10", -1.0))[0]
        with best.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)
        from shopsight.training.models import build_model

        model = build_model(model_name, n_items=sequences.n_items, **model_config)
        model.load_state_dict(evaluated_weights(state))
        model.eval()
        max_len = model.cfg.max_len
        test = evaluate_next_item(scorer(model), split, "test", max_len, seed=loop.seed)
        popularity = evaluate_next_item(Popularity(split), split, "test", max_len, seed=loop.seed)
        public = {k: v for k, v in test.items() if not k.startswith("_")}
        mlflow.log_metrics({f"test_{k.replace('@', '_at_')}": v for k, v in public.items()})
        mlflow.log_metrics(
            {
                f"popularity_{k.replace('@', '_at_')}": v
                for k, v in popularity.items()
                if not k.startswith("_")
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            _plots(MlflowClient(uri), run.info.run_id, test, tmp)
            report = _report(model_name, public, popularity, identity, state["epoch"])
            (tmp / "evaluation.md").write_text(report)
            mlflow.log_artifacts(str(tmp), artifact_path="evaluation")
            folder = save_model_dir(tmp / "model_dir", model_name, model, sequences.item_ids)
            example = _input_example(sequences)
            info = log_next_item_model(folder, example, registered_name=registered_model)
            expected = _predict_local(folder, example)
        version = str(info.registered_model_version)
        mark_challenger(uri, registered_model, version, {"model": model_name, **identity})
        _check_round_trip(f"models:/{registered_model}/{version}", example, expected)
        log(report)
    return TrainSummary(
        run_id=run.info.run_id,
        model_uri=f"models:/{registered_model}@{CHALLENGER}",
        registered_model=registered_model,
        version=version,
        test=public,
        popularity={k: v for k, v in popularity.items() if not k.startswith("_")},
        epochs=int(state["epoch"]),
        seconds=time.perf_counter() - started,
    )


def _load_teachers(
    settings: Settings, uris: list[str], sequences: SequenceData, model_config: dict, weight: float
) -> list[dict]:
    """The teachers' networks as the Ray workers rebuild them; each must know exactly this data's items."""
    from shopsight.training.evaluate import load_recommender

    if uris and model_config.get("loss", "bce") == "bce":
        raise ShopsightError("distillation needs --loss sampled_softmax or softmax, not bce")
    if uris and not 0.0 < weight <= 1.0:
        raise ShopsightError(f"the distillation weight must be in (0, 1], not {weight}")
    states = []
    for uri in uris:
        teacher = load_recommender(settings, uri)
        if not np.array_equal(teacher.item_ids, sequences.item_ids):
            raise ShopsightError(
                f"teacher {uri} was trained on another item catalogue ({len(teacher.item_ids) - 1:,} items; "
                f"this data has {sequences.n_items:,}): teachers must come from the same data"
            )
        net = teacher.model
        states.append({"model": teacher.model_name, "config": asdict(net.cfg), "state": net.state_dict()})
    return states


def _input_example(sequences: SequenceData) -> pd.DataFrame:
    """Two histories of different lengths, in the shop's item ids."""
    long = sequences.item_ids[sequences.sequences[0][-20:]].tolist()
    short = sequences.item_ids[sequences.sequences[-1][-3:]].tolist()
    return pd.DataFrame({"item_ids": [long, short]})


def _predict_local(folder: Path, example: pd.DataFrame) -> pd.DataFrame:
    from shopsight.training.next_item_model import NextItemRecommender

    recommender = NextItemRecommender()
    recommender._load(folder)
    return recommender.predict(None, example, {"k": 10})


def _check_round_trip(model_uri: str, example: pd.DataFrame, expected: pd.DataFrame) -> None:
    import mlflow

    loaded = mlflow.pyfunc.load_model(model_uri)
    got = loaded.predict(example, params={"k": 10})
    if got["items"].tolist() != expected["items"].tolist() or not np.allclose(
        np.array(got["scores"].tolist()), np.array(expected["scores"].tolist())
    ):
        raise ShopsightError(f"{model_uri} loaded back gives other predictions than the trained model")


def _plots(client, run_id: str, test: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, axis in (("loss", left), ("valid_ndcg_at_10", right)):
        history = client.get_metric_history(run_id, key)
        axis.plot([m.step for m in history], [m.value for m in history], marker=".")
        axis.set_xlabel("epoch")
        axis.set_title(key)
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=100)
    plt.close(fig)

    lengths, sampled, full = test["_lengths"], test["_ranks_sampled"], test["_ranks_full"]
    buckets = [(1, 5), (6, 10), (11, 20), (21, 50), (51, 10_000)]
    labels, hr, hr_full = [], [], []
    for lo, hi in buckets:
        chosen = (lengths >= lo) & (lengths <= hi)
        if chosen.any():
            labels.append(f"{lo}-{hi}" if hi < 10_000 else f">{lo - 1}")
            hr.append(float((sampled[chosen] < 10).mean()))
            hr_full.append(float((full[chosen] < 10).mean()))
    fig, axis = plt.subplots(figsize=(6, 4))
    x = np.arange(len(labels))
    axis.bar(x - 0.2, hr, 0.4, label="HR@10 (100 sampled negatives)")
    axis.bar(x + 0.2, hr_full, 0.4, label="HR@10 (full ranking)")
    axis.set_xticks(x, labels)
    axis.set_xlabel("history length")
    axis.legend()
    fig.tight_layout()
    fig.savefig(folder / "hr_by_sequence_length.png", dpi=100)
    plt.close(fig)


def _report(model_name: str, test: dict, popularity: dict, identity: dict, epoch: int) -> str:
    rows = [
        ("HR@10", "hr@10"),
        ("NDCG@10", "ndcg@10"),
        ("HR@10 full", "hr@10_full"),
        ("NDCG@10 full", "ndcg@10_full"),
    ]
    lines = [
        f"# Next-item evaluation: {model_name} (best epoch {epoch})",
        "",
        f"Data: {identity['dataset.path']} (sha256 {identity['dataset.sha256'][:12]}), leave-one-out test, "
        f"{int(test['users']):,} users; sampled = the target among 100 uniformly sampled unseen items.",
        "",
        f"| metric | {model_name} | popularity |",
        "| --- | ---: | ---: |",
        *[f"| {label} | {test[key]:.4f} | {popularity[key]:.4f} |" for label, key in rows],
    ]
    return "\n".join(lines) + "\n"


def json_summary(summary: TrainSummary) -> str:
    return json.dumps(asdict(summary), indent=2, default=str)
