"""`shopsight tune`: sweep a next-item model's hyperparameters (Ray Tune: Optuna search, ASHA)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shopsight.cli._context import state
from shopsight.platform import ShopsightError, console, print_summary
from shopsight.platform.ray_cluster import connect


def tune_command(
    ctx: typer.Context,
    data: Annotated[
        Path, typer.Option(help="Interactions: SASRec text ('user item' lines), Taobao CSV or parquet.")
    ],
    model: Annotated[str, typer.Option(help="sasrec | lstm.")] = "sasrec",
    trials: Annotated[int, typer.Option(min=1, help="Trials (hyperparameter configurations) to run.")] = 16,
    epochs: Annotated[
        int, typer.Option(min=1, help="Maximum epochs per trial (ASHA stops weak trials sooner).")
    ] = 20,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers per trial.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per worker (0: CPU).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the Optuna sampler and of every trial's training.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per step and worker.")] = 128,
    max_len: Annotated[int, typer.Option(min=1, help="Longest history the model reads.")] = 50,
    concurrent: Annotated[
        int | None, typer.Option(min=1, help="Trials at once (default: as many as the cluster holds).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the sweep (MLflow parent run, Tune run).")] = None,
) -> None:
    """Sweep a model's hyperparameters with Ray Tune (Optuna search, ASHA), one MLflow child run per
    trial; register the best trial's model as the `challenger`."""
    from shopsight.training.loop import LoopConfig
    from shopsight.training.tune import check_tunable, tune_next_item_model

    check_tunable(model)
    if not data.exists():
        raise ShopsightError(f"{data} does not exist")
    settings = state(ctx).settings
    connect(settings)
    summary = tune_next_item_model(
        settings,
        data,
        model,
        trials,
        epochs,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        seed=seed,
        model_config={"max_len": max_len},
        loop=LoopConfig(batch_size=batch_size),
        max_concurrent=concurrent,
        run_name=name,
        log=console.print,
    )
    best = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.best_params.items()
    )
    print_summary(
        "Tuned",
        {
            "trials": f"{len(summary.trials)} ({summary.stopped_early} stopped early by ASHA)",
            "best parameters": best,
            "best valid NDCG@10": f"{summary.best_valid_ndcg:.4f}",
            "test HR@10 / NDCG@10 (sampled)": f"{summary.test['hr@10']:.4f} / {summary.test['ndcg@10']:.4f}",
            "full ranking": f"{summary.test['hr@10_full']:.4f} / {summary.test['ndcg@10_full']:.4f}",
            "popularity": f"{summary.popularity['hr@10']:.4f} / {summary.popularity['ndcg@10']:.4f}",
            "model": f"{summary.registered_model} version {summary.version} (alias challenger)",
            "MLflow run": summary.run_url,
            "took": f"{summary.seconds:.1f} s",
        },
    )
