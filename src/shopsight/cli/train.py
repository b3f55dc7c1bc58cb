"""`shopsight train` and `shopsight evaluate`: any task of the task table with Ray Train, MLflow and the
protocols of docs/architecture.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from shopsight.cli._context import input_path, model_uri_option, state
from shopsight.cli._output import OutputOption, emit, snake
from shopsight.platform import err_console, print_summary
from shopsight.platform.ray_cluster import connect
from shopsight.training.binary.calibration import METHODS
from shopsight.training.models import LOSSES
from shopsight.training.runtime.options import LR_SCHEDULES, SWA_AUTO
from shopsight.training.tasks import TASKS, Task, get_task, model_families, task_for

# the choices of --model, --task, --loss and --calibration, from the tables that define them: help lists
# them, and a value not among them is a usage error before anything starts
ModelName = Literal[tuple(model_families())]  # type: ignore[valid-type]
TaskName = Literal[("auto", *TASKS)]  # type: ignore[valid-type]
LossName = Literal[LOSSES]  # type: ignore[valid-type]
CalibrationName = Literal[METHODS]  # type: ignore[valid-type]
ScheduleName = Literal[LR_SCHEDULES]  # type: ignore[valid-type]


def _swa_start(value: str) -> int | str:
    """--swa-start: an epoch (0: off) or auto."""
    if value == SWA_AUTO:
        return value
    if value.isdigit():
        return int(value)
    raise typer.BadParameter(f"{value!r} is neither an epoch number nor {SWA_AUTO!r}")


def _labels(path: Path) -> list[str]:
    """The label columns of a training set (none for interactions or what is not parquet)."""
    import pyarrow.parquet as pq

    from shopsight.training.binary.data import LABELS

    try:
        names = pq.read_schema(path).names
    except Exception:  # noqa: BLE001 - not parquet (SASRec text, CSV) or a folder
        return []
    return [label for label in LABELS if label in names]


def resolve_task(task: str, model: str, data: Path) -> Task:
    """The task named by ``--task``, or the one that trains ``model`` on ``data``'s kind of data."""
    from shopsight.platform import ShopsightError

    try:
        chosen = task_for(model, _labels(data)) if task == "auto" else get_task(task)
        chosen.check_model(model)
    except ShopsightError as exc:
        raise typer.BadParameter(str(exc), param_hint="--task") from None
    return chosen


def train_command(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Option(
            help="Interactions (SASRec text 'user item' lines, Taobao CSV or parquet) for next-item models; "
            "for the tasks on user snapshots, a training set of the task's feature service "
            "(`shopsight features training-set`).",
            callback=input_path,
        ),
    ],
    model: Annotated[
        ModelName, typer.Option(help="The model family (gan: synthetic users, from a training set).")
    ] = "sasrec",
    workers: Annotated[
        int, typer.Option(min=1, help="Ray Train workers (DDP: gloo on CPU, NCCL on GPU).")
    ] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per worker (0: CPU).")] = 0,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="The most epochs: training stops at its validation plateau (--patience) before that.",
            show_default="until the plateau, at most 400 (next item) or 100 (user snapshots); gan 20",
        ),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Stop after this many epochs without a better validation metric (whole validations).",
            show_default="4 validations: 4 x --eval-every",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="Rows per step and worker.", show_default="128; user snapshots 256; gan 500"
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Adam learning rate.", show_default="1e-3; gan 2e-4 for both networks"),
    ] = None,
    lr_schedule: Annotated[
        ScheduleName,
        typer.Option(
            help="constant; cosine: linear warm-up over 5 epochs, then cosine decay to 1% at the --epochs "
            "cap; plateau: the same warm-up, then halved at each validation without a better metric."
        ),
    ] = "constant",
    max_len: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Longest history the model reads.",
            show_default="from the data: the 90th percentile of history length, rounded up to 50, 50-400",
        ),
    ] = None,
    loss: Annotated[
        LossName | None,
        typer.Option(
            help="Next item: bce (the SASRec paper's), sampled_softmax, gbce (calibrated BCE over many "
            "sampled negatives) or softmax (full catalogue).",
            show_default="sampled_softmax (it beat bce on games.txt)",
        ),
    ] = None,
    d_model: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Next item: the embedding width.",
            show_default="from the data: 50 (lstm 64) for short histories or sparse items, up to 256",
        ),
    ] = None,
    dropout: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.9,
            help="Next item: dropout.",
            show_default="from the data: 0.5 under 20 interactions per item, 0.3 under 100, else 0.2",
        ),
    ] = None,
    negatives: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Next item: sampled negatives shared across a batch (sampled_softmax, gbce).",
            show_default="from the data: 256 under 50,000 items, 512 under 500,000, else 1,024",
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(min=1, help="Validate every N epochs.", show_default="5; user snapshots 1"),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Run name; the same name resumes an interrupted run.")
    ] = None,
    task: Annotated[
        TaskName, typer.Option(help="The task (auto: by the model and the data's label).")
    ] = "auto",
    pos_weight: Annotated[
        str,
        typer.Option(
            help="Tasks on user snapshots: the positives' loss weight, a number or 'balanced' (negatives "
            "per positive)."
        ),
    ] = "balanced",
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Tasks on user snapshots: start from this registered next-item model (models:/NAME@ALIAS)."
        ),
    ] = None,
    calibration: Annotated[
        CalibrationName,
        typer.Option(
            help="Tasks on user snapshots: calibrate on the validation day (auto: isotonic with 1,000+ "
            "rows, else Platt; identity: not at all)."
        ),
    ] = "auto",
    teacher: Annotated[
        list[str] | None,
        typer.Option(
            metavar="URI",
            help="Next item: distil this registered next-item model, trained on the same data, into the new "
            "one (repeatable: the teachers' mean scores). Needs --loss sampled_softmax or softmax.",
        ),
    ] = None,
    distill_weight: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="With --teacher: the distillation term's loss share.")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Seeds the initial weights, the batches and the validation.")] = 0,
    swa_start: Annotated[
        str,
        typer.Option(
            help="Average the weights of every epoch from this one on (stochastic weight averaging); "
            "validation and the registered model use the average. 0: off; auto: from the first validation "
            "that improves on the best by less than 1% (where the curve flattens).",
            callback=_swa_start,
        ),
    ] = "0",
) -> None:
    """Train a model of any task with Ray Train, track it in MLflow, register it as the `challenger`."""
    from shopsight.training.runtime.options import TrainOptions
    from shopsight.training.runtime.tracking import train_task

    settings = state(ctx).settings
    chosen = resolve_task(task, model, data)
    chosen.code.check_data(data)  # bad data fails before Ray and MLflow start
    options = TrainOptions(
        workers=workers, gpus_per_worker=gpus_per_worker, epochs=epochs, patience=patience,
        batch_size=batch_size, lr=lr, lr_schedule=lr_schedule, eval_every=eval_every, seed=seed, name=name,
        max_len=max_len, loss=loss, d_model=d_model, dropout=dropout, negatives=negatives,
        swa_start=swa_start, teachers=tuple(teacher or ()), distill_weight=distill_weight,
        pos_weight=pos_weight, pretrained=pretrained, calibration=calibration,
    )  # fmt: skip
    connect(settings)
    summary = train_task(settings, chosen, model, data, options, log=err_console.print)
    print_summary(
        "Trained",
        {
            **summary_rows(chosen, summary),
            "MLflow run": summary.run_id,
            "took": f"{summary.seconds:.1f} s: {summary.convergence()}",
        },
    )


def summary_rows(task: Task, summary) -> dict[str, str]:
    """What a run's summary shows of its model: the version, the test metrics beside each baseline's."""
    shown = task.reported[:3]
    label = " / ".join(m.label for m in shown)
    rows = {
        "model": f"{summary.registered_model} version {summary.version} (alias challenger)",
        f"test {label}": " / ".join(f"{summary.test[m.key]:.4f}" for m in shown),
    }
    for name, metrics in summary.baselines.items():
        rows[name] = " / ".join(f"{metrics[m.key]:.4f}" for m in shown if m.key in metrics)
    return rows


def evaluate_command(
    ctx: typer.Context,
    model_uri: Annotated[
        str,
        typer.Option(
            help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model.", callback=model_uri_option
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            help="Interactions (next item) or a training set of the model's task.", callback=input_path
        ),
    ],
    users: Annotated[
        int | None, typer.Option(help="Evaluate a seeded sample of this many users.", show_default="all")
    ] = None,
    output: OutputOption = "table",
) -> None:
    """Run the protocol of the model's task and print the table beside the task's baselines.

    With -o json or yaml: one record per model (the model's, then each baseline's) with the task's
    metrics, e.g. {"model": ..., "users": 1000, "hr_at_10": 0.41, ...}.
    """
    from shopsight.platform import ShopsightError

    settings = state(ctx).settings
    labels = _labels(data)
    evaluable = [t for t in TASKS.values() if hasattr(t.code, "evaluate")]
    fitting = [
        t for t in evaluable if (t.data.label in labels if labels else t.data.source == "interactions")
    ]
    if not fitting:
        raise ShopsightError(f"{data}: no task evaluates models on this data")
    chosen = fitting[0]
    rows = chosen.code.evaluate(settings, model_uri, data, users)
    metrics = (chosen.unit, *chosen.reported)
    records = [
        {"model": name, **{snake(m.key): values.get(m.key) for m in metrics}} for name, values in rows.items()
    ]

    def table() -> Table:
        shown = Table(title=f"{chosen.name} protocol on {data.name}", title_justify="left")
        shown.add_column("model")
        for column in metrics:
            shown.add_column(column.label, justify="right")
        for name, values in rows.items():
            cells = [f"{int(values[chosen.unit.key]):,}"] + [
                f"{values[m.key]:.4f}" if m.key in values else "-" for m in chosen.reported
            ]
            shown.add_row(name, *cells)
        return shown

    emit(output, records, table)
