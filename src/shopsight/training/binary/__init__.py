"""What the binary tasks on user snapshots share (purchase, churn): their data and time split, the fit
step of the sequence models' user head, calibration, the tree baseline and the oracle, the pyfunc, and
the hooks the tasks' packages hand to the CLI, jobs and the gate."""

from __future__ import annotations

from pathlib import Path


def check_data(task: str, data: Path) -> None:
    """Fail before Ray and MLflow start when ``data`` is not a usable training set of ``task``."""
    from shopsight.training.binary.train import read_task_data
    from shopsight.training.tasks import get_task

    read_task_data(get_task(task), data)


# without --epochs, training runs to its validation plateau (4 epochs without a better ROC-AUC); this many
# epochs at most
MAX_EPOCHS = 100


def loop(options):
    """The fit loop's settings from ``shopsight train``'s options, with these tasks' defaults."""
    from shopsight.training.runtime.loop import LoopConfig

    return LoopConfig(
        epochs=options.epochs or MAX_EPOCHS,
        batch_size=options.batch_size or 256,
        lr=options.lr or 1e-3,
        lr_schedule=options.lr_schedule,
        eval_every=options.eval_every or 1,
        patience=options.patience or 4,
        weight_decay=1e-5,
        seed=options.seed,
        swa_start=options.swa_start,
    )


def prepare(task: str, settings, model: str, data: Path, options, loop, model_config: dict | None = None):
    """The data made ready for training runs (see :func:`shopsight.training.binary.train.prepare`)."""
    from shopsight.platform import ShopsightError
    from shopsight.training.binary.train import prepare as prepare_data

    pos_weight = options.pos_weight
    if pos_weight != "balanced":
        try:
            pos_weight = float(pos_weight)
        except ValueError:
            raise ShopsightError(f"--pos-weight: {pos_weight!r} is neither a number nor 'balanced'") from None
    return prepare_data(
        settings, task, model, data, model_config=model_config, loop=loop, pos_weight=pos_weight,
        pretrained=options.pretrained, calibration=options.calibration, scratch=options.name,
    )  # fmt: skip


def evaluate(settings, model_uri: str, data: Path, users: int | None = None) -> dict[str, dict[str, float]]:
    """``shopsight evaluate``: the registered model and trees on the last snapshot day of ``data``."""
    from shopsight.training.binary.evaluate import evaluate_snapshot_model_uri

    return evaluate_snapshot_model_uri(settings, model_uri, data)


def evaluate_version(settings, task, model_uri: str, version: str, data: Path, seed: int):
    """The promotion gate's checks and protocol for a registered version (see
    :func:`shopsight.training.binary.evaluate.evaluate_version`)."""
    from shopsight.training.binary.evaluate import evaluate_version as evaluate

    return evaluate(settings, task, model_uri, version, data, seed)


def paired_difference(candidate, champion):
    """How the gate pairs two versions' evaluations: per test row."""
    from shopsight.training.binary.evaluate import paired_difference as paired

    return paired(candidate, champion)


def task_hooks(task: str) -> tuple:
    """The hooks a task's package hands the platform, bound to ``task``: ``check_data``, ``loop``,
    ``prepare``, ``evaluate``, ``evaluate_version``, ``paired_difference``."""
    from functools import partial

    return (
        partial(check_data, task),
        loop,
        partial(prepare, task),
        evaluate,
        evaluate_version,
        paired_difference,
    )
