"""The next-item task: the item a user interacts with next, ranked over the catalogue (leave-one-out
protocol, HR@10 and NDCG@10, sampled and full ranking, beside popularity). Its entry in
:data:`shopsight.training.tasks.TASKS` names this package; the hooks below are what the CLI, jobs and the
gate call."""

from __future__ import annotations

from pathlib import Path


def check_data(data: Path) -> None:
    """Fail before Ray and MLflow start when ``data`` holds no history to train on."""
    from shopsight.training.next_item.data import SequenceData

    SequenceData.from_file(data)


def loop(options):
    """The fit loop's settings from ``shopsight train``'s options, with this task's defaults."""
    from shopsight.training.runtime.loop import LoopConfig

    return LoopConfig(
        epochs=options.epochs,
        batch_size=options.batch_size or 128,
        lr=options.lr or 1e-3,
        eval_every=options.eval_every or 5,
        seed=options.seed,
        distill_weight=options.distill_weight,
        swa_start=options.swa_start,
    )


def prepare(settings, model: str, data: Path, options, loop, model_config: dict | None = None):
    """The data made ready for training runs (see :func:`shopsight.training.next_item.train.prepare`)."""
    from shopsight.training.next_item.train import prepare as prepare_data

    config = {"max_len": options.max_len, "loss": options.loss, **(model_config or {})}
    return prepare_data(
        settings, model, data, model_config=config, loop=loop, teachers=list(options.teachers)
    )


def search_space(model: str) -> dict:
    """What a sweep of this task explores beside the network's shape: the next-item loss."""
    from ray import tune

    return {"loss": tune.choice(["bce", "sampled_softmax"])} if model == "sasrec" else {}


def evaluate(settings, model_uri: str, data: Path, users: int | None = None) -> dict[str, dict[str, float]]:
    """``shopsight evaluate``: the registered model and popularity on ``data``'s leave-one-out test."""
    from shopsight.training.next_item.evaluate import evaluate_model_uri

    return evaluate_model_uri(settings, model_uri, data, max_users=users)


def evaluate_version(settings, task, model_uri: str, version: str, data: Path, seed: int):
    """The promotion gate's checks and protocol for a registered version (see
    :func:`shopsight.training.next_item.evaluate.evaluate_version`)."""
    from shopsight.training.next_item.evaluate import evaluate_version as evaluate

    return evaluate(settings, task, model_uri, version, data, seed)


def paired_difference(candidate, champion):
    """How the gate pairs two versions' evaluations: per user."""
    from shopsight.training.next_item.evaluate import paired_difference as paired

    return paired(candidate, champion)
