"""`shopsight tune`: sweep a model's hyperparameters for any task (Ray Tune: Optuna search, ASHA)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from shopsight.cli._context import input_path, state
from shopsight.cli.train import TaskName, resolve_task, summary_rows
from shopsight.platform import err_console, print_summary
from shopsight.platform.ray_cluster import connect
from shopsight.training.models import TUNABLE_MODELS

TunableName = Literal[TUNABLE_MODELS]  # type: ignore[valid-type]


def tune_command(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Option(
            help="Interactions (SASRec text 'user item' lines, Taobao CSV or parquet) for next-item models; "
            "for the tasks on user snapshots, a training set of the task's feature service.",
            callback=input_path,
        ),
    ],
    model: Annotated[
        TunableName, typer.Option(help="The model family (those with a search space).")
    ] = "sasrec",
    task: Annotated[
        TaskName, typer.Option(help="The task (auto: by the model and the data's label).")
    ] = "auto",
    trials: Annotated[int, typer.Option(min=1, help="Trials (hyperparameter configurations) to run.")] = 16,
    epochs: Annotated[
        int, typer.Option(min=1, help="Maximum epochs per trial (ASHA stops weak trials sooner).")
    ] = 20,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers per trial.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per worker (0: CPU).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the Optuna sampler and of every trial's training.")] = 0,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Rows per step and worker.", show_default="the task's")
    ] = None,
    max_len: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Longest history the model reads (fixed; without it, next-item sweeps try 50 to 400, up to "
            "twice the length chosen from the data).",
            show_default="from the data",
        ),
    ] = None,
    concurrent: Annotated[
        int | None,
        typer.Option(min=1, help="Trials at once.", show_default="as many as the cluster holds"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the sweep (MLflow parent run, Tune run).")] = None,
) -> None:
    """Sweep a model's hyperparameters with Ray Tune (Optuna search, ASHA), one MLflow child run per
    trial; register the best trial's model as the `challenger`."""
    from shopsight.training.runtime.options import TrainOptions
    from shopsight.training.runtime.tune import check_tunable, tune_model

    check_tunable(model)
    chosen = resolve_task(task, model, data)
    chosen.code.check_data(data)
    options = TrainOptions(
        workers=workers, gpus_per_worker=gpus_per_worker, epochs=epochs, batch_size=batch_size, seed=seed,
        name=name, max_len=max_len,
    )  # fmt: skip
    loop = chosen.code.loop(options)
    settings = state(ctx).settings
    fixed = {"max_len": max_len} if max_len else None
    prepared = chosen.code.prepare(settings, model, data, options, loop, fixed)
    connect(settings)
    summary = tune_model(
        settings,
        prepared,
        trials,
        epochs,
        loop=loop,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        seed=seed,
        max_concurrent=concurrent,
        run_name=name,
        log=err_console.print,
    )
    best = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.best_params.items()
    )
    rows = summary_rows(chosen, summary)
    print_summary(
        "Tuned",
        {
            "trials": f"{len(summary.trials)} ({summary.stopped_early} stopped early by ASHA)",
            "best parameters": best,
            f"best valid {chosen.metric.label}": f"{summary.best_valid:.4f}",
            **rows,
            "MLflow run": summary.run_url,
            "took": f"{summary.seconds:.1f} s",
        },
    )
