"""`shopsight train` and `shopsight evaluate`: next-item models with Ray Train, MLflow and the protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shopsight.cli._context import state
from shopsight.platform import Settings, console, print_summary


def _ray(settings: Settings) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address=settings.ray.address,
            num_cpus=settings.ray.num_cpus,
            include_dashboard=False,
        )


def train_command(
    ctx: typer.Context,
    data: Annotated[
        Path, typer.Option(help="Interactions: SASRec text ('user item' lines), Taobao CSV or parquet.")
    ],
    model: Annotated[str, typer.Option(help="sasrec | lstm.")] = "sasrec",
    workers: Annotated[
        int, typer.Option(min=1, help="Ray Train workers (DDP: gloo on CPU, NCCL on GPU).")
    ] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per worker (0: CPU).")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Maximum epochs (early stopping may end sooner).")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per step and worker.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    max_len: Annotated[int, typer.Option(min=1, help="Longest history the model reads.")] = 50,
    loss: Annotated[str, typer.Option(help="bce (the SASRec paper's) | sampled_softmax.")] = "bce",
    eval_every: Annotated[int, typer.Option(min=1, help="Validate every N epochs.")] = 5,
    name: Annotated[
        str | None, typer.Option(help="Run name; the same name resumes an interrupted run.")
    ] = None,
) -> None:
    """Train a next-item model with Ray Train, track it in MLflow, register it as the `challenger`."""
    from shopsight.training.loop import LoopConfig
    from shopsight.training.models import MODELS
    from shopsight.training.train import train_next_item_model

    settings = state(ctx).settings
    if model not in MODELS:
        raise typer.BadParameter(
            f"unknown model {model!r}: choose one of {', '.join(sorted(MODELS))}", param_hint="--model"
        )
    if not data.exists():
        raise typer.BadParameter(f"{data} does not exist", param_hint="--data")
    _ray(settings)
    summary = train_next_item_model(
        settings,
        model,
        data,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        model_config={"max_len": max_len, "loss": loss},
        loop=LoopConfig(epochs=epochs, batch_size=batch_size, lr=lr, eval_every=eval_every),
        run_name=name,
        log=console.print,
    )
    print_summary(
        "Trained",
        {
            "model": f"{summary.registered_model} version {summary.version} (alias challenger)",
            "test HR@10 / NDCG@10 (sampled)": f"{summary.test['hr@10']:.4f} / {summary.test['ndcg@10']:.4f}",
            "full ranking": f"{summary.test['hr@10_full']:.4f} / {summary.test['ndcg@10_full']:.4f}",
            "popularity": f"{summary.popularity['hr@10']:.4f} / {summary.popularity['ndcg@10']:.4f}",
            "MLflow run": summary.run_id,
            "took": f"{summary.seconds:.1f} s ({summary.epochs} epochs)",
        },
    )


def evaluate_command(
    ctx: typer.Context,
    model_uri: Annotated[
        str, typer.Option(help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model.")
    ],
    data: Annotated[Path, typer.Option(help="Interactions in any supported format.")],
    users: Annotated[int | None, typer.Option(help="Evaluate a seeded sample of this many users.")] = None,
) -> None:
    """Run the next-item protocol (leave-one-out; sampled and full ranking) and print the table."""
    from shopsight.training.evaluate import evaluate_model_uri

    settings = state(ctx).settings
    rows = evaluate_model_uri(settings, model_uri, data, max_users=users)
    table = Table(title=f"Next-item protocol on {data.name}", title_justify="left")
    table.add_column("model")
    for column in ("users", "HR@10", "NDCG@10", "HR@10 full", "NDCG@10 full"):
        table.add_column(column, justify="right")
    for name, m in rows.items():
        table.add_row(
            name,
            f"{int(m['users']):,}",
            *(f"{m[k]:.4f}" for k in ("hr@10", "ndcg@10", "hr@10_full", "ndcg@10_full")),
        )
    console.print(table)
