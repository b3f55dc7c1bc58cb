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


# without --epochs, training runs to its validation plateau; this many epochs at most (the recorded
# games.txt runs peaked between epochs 40 and 80)
MAX_EPOCHS = 400


def loop(options):
    """The fit loop's settings from ``shopsight train``'s options, with this task's defaults."""
    from shopsight.training.runtime.loop import LoopConfig

    return LoopConfig(
        epochs=options.epochs or MAX_EPOCHS,
        batch_size=options.batch_size or 128,
        lr=options.lr or 1e-3,
        eval_every=options.eval_every or 5,
        patience=options.patience,
        seed=options.seed,
        distill_weight=options.distill_weight,
        swa_start=options.swa_start,
        lr_schedule=options.lr_schedule,
    )


def prepare(settings, model: str, data: Path, options, loop, model_config: dict | None = None):
    """The data made ready for training runs (see :func:`shopsight.training.next_item.train.prepare`):
    the options the user set, and the others chosen from the data."""
    from shopsight.training.next_item.train import prepare as prepare_data

    given = {
        "max_len": options.max_len,
        "loss": options.loss,
        "d_model": options.d_model,
        "dropout": options.dropout,
        "n_negatives": options.negatives,
    }
    config = {**{k: v for k, v in given.items() if v is not None}, **(model_config or {})}
    return prepare_data(
        settings, model, data, model_config=config, loop=loop, teachers=list(options.teachers), from_data=True
    )


def search_space(model: str, fixed: dict | None = None) -> dict:
    """What a sweep of this task explores beside the network's shape: the next-item loss (SASRec), and
    history lengths of 50 to 400 events up to twice the one chosen for the data (``fixed["max_len"]``):
    longer inputs than that would only be padding, and cost the trial time."""
    from ray import tune

    chosen = (fixed or {}).get("max_len") or MAX_LEN_CHOICES[-1]
    lengths = [n for n in MAX_LEN_CHOICES if n <= 2 * chosen] or [MAX_LEN_CHOICES[0]]
    space = {"max_len": tune.choice(lengths)} if len(lengths) > 1 else {}
    return {**space, "loss": tune.choice(["bce", "sampled_softmax"])} if model == "sasrec" else space


MAX_LEN_CHOICES = (50, 100, 200, 400)


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
