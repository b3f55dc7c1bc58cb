"""`shopsight train` and `shopsight evaluate`: next-item and purchase models with Ray Train, MLflow and the
protocols of architecture.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shopsight.cli._context import state
from shopsight.platform import console, print_summary
from shopsight.platform.ray_cluster import connect


def _is_training_set(path: Path) -> bool:
    """A parquet file with the purchase label: a training set of the purchase feature service."""
    import pyarrow.parquet as pq

    try:
        return "buy_next_1d" in pq.read_schema(path).names
    except Exception:  # noqa: BLE001 - not parquet (SASRec text, CSV) or a folder
        return False


def train_command(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Option(
            help="Next item: interactions (SASRec text 'user item' lines, Taobao CSV or parquet). "
            "Purchase: a training set of purchase_propensity_v1 (`shopsight features training-set`)."
        ),
    ],
    model: Annotated[
        str, typer.Option(help="sasrec | lstm | gan (synthetic users, from a purchase training set).")
    ] = "sasrec",
    workers: Annotated[
        int, typer.Option(min=1, help="Ray Train workers (DDP: gloo on CPU, NCCL on GPU).")
    ] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per worker (0: CPU).")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Maximum epochs (early stopping may end sooner).")] = 20,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Rows per step and worker [default: 128; purchase 256; gan 500]."),
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate [default: 1e-3; gan 2e-4 for both networks].")
    ] = None,
    max_len: Annotated[int, typer.Option(min=1, help="Longest history the model reads.")] = 50,
    loss: Annotated[
        str, typer.Option(help="bce (the SASRec paper's) | sampled_softmax | softmax (full catalogue).")
    ] = "bce",
    eval_every: Annotated[int, typer.Option(min=1, help="Validate every N epochs.")] = 5,
    name: Annotated[
        str | None, typer.Option(help="Run name; the same name resumes an interrupted run.")
    ] = None,
    task: Annotated[
        str, typer.Option(help="auto (purchase for a training set, else next-item) | next-item | purchase.")
    ] = "auto",
    pos_weight: Annotated[
        str,
        typer.Option(help="Purchase: buyers' loss weight, a number or 'balanced' (non-buyers per buyer)."),
    ] = "balanced",
    pretrained: Annotated[
        str | None,
        typer.Option(help="Purchase: start from this registered next-item model (models:/NAME@ALIAS)."),
    ] = None,
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
    seed: Annotated[
        int, typer.Option(help="Next item: seeds the initial weights, the batches and the validation users.")
    ] = 0,
    swa_start: Annotated[
        int,
        typer.Option(
            min=0,
            help="Next item: average the weights of every epoch from this one on (stochastic weight "
            "averaging); validation and the registered model use the average. 0: off.",
        ),
    ] = 0,
) -> None:
    """Train a next-item or purchase model with Ray Train, track it in MLflow, register it as the
    `challenger`."""
    from shopsight.training.loop import LoopConfig
    from shopsight.training.train import train_next_item_model
    from shopsight.training.train_purchase import SEQUENCE_MODELS

    settings = state(ctx).settings
    if model not in (*SEQUENCE_MODELS, "gan"):
        raise typer.BadParameter(
            f"unknown model {model!r}: choose one of {', '.join(SEQUENCE_MODELS)}, gan", param_hint="--model"
        )
    if not data.exists():
        raise typer.BadParameter(f"{data} does not exist", param_hint="--data")
    if model == "gan":
        _train_gan(settings, data, workers, gpus_per_worker, epochs, batch_size, lr, name)
        return
    if task not in ("auto", "next-item", "purchase"):
        raise typer.BadParameter(f"unknown task {task!r}: auto, next-item or purchase", param_hint="--task")
    if task == "purchase" or (task == "auto" and _is_training_set(data)):
        _train_purchase(
            settings, data, model, workers, gpus_per_worker, epochs, lr or 1e-3, batch_size or 256, name,
            pos_weight, pretrained,
        )  # fmt: skip
        return
    connect(settings)
    summary = train_next_item_model(
        settings,
        model,
        data,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        model_config={"max_len": max_len, "loss": loss},
        loop=LoopConfig(
            epochs=epochs,
            batch_size=batch_size or 128,
            lr=lr or 1e-3,
            eval_every=eval_every,
            seed=seed,
            distill_weight=distill_weight,
            swa_start=swa_start,
        ),
        run_name=name,
        teachers=teacher,
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


def _train_purchase(
    settings, data, model, workers, gpus, epochs, lr, batch_size, name, pos_weight, pretrained
) -> None:
    from shopsight.training.loop import LoopConfig
    from shopsight.training.purchase_data import TimeSplit, read_training_set
    from shopsight.training.train_purchase import train_purchase_model

    TimeSplit.of(read_training_set(data), str(data))  # bad data fails before Ray and MLflow start
    if pos_weight != "balanced":
        try:
            pos_weight = float(pos_weight)
        except ValueError:
            raise typer.BadParameter(
                f"{pos_weight!r} is neither a number nor 'balanced'", param_hint="--pos-weight"
            ) from None
    connect(settings)
    summary = train_purchase_model(
        settings,
        model,
        data,
        workers=workers,
        gpus_per_worker=gpus,
        loop=LoopConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, eval_every=1, patience=4, weight_decay=1e-5
        ),
        pos_weight=pos_weight,
        pretrained=pretrained,
        run_name=name,
        log=console.print,
    )
    print_summary(
        "Trained",
        {
            "model": f"{summary.registered_model} version {summary.version} (alias challenger)",
            "test ROC-AUC / PR-AUC": f"{summary.test['roc_auc']:.4f} / {summary.test['pr_auc']:.4f}",
            **{name: f"{r['roc_auc']:.4f} / {r['pr_auc']:.4f}" for name, r in summary.baselines.items()},
            "MLflow run": summary.run_id,
            "took": f"{summary.seconds:.1f} s ({summary.epochs} epochs)",
        },
    )


def _train_gan(settings, data, workers, gpus, epochs, batch_size, lr, name) -> None:
    from shopsight.training.train_gan import GanData, train_gan_model

    if workers != 1:
        raise typer.BadParameter(
            "the GAN trains on one worker: its gradient penalty needs a double backward, which "
            "DistributedDataParallel does not support",
            param_hint="--workers",
        )
    GanData.read(data)  # bad data fails before Ray and MLflow start
    config: dict = {"epochs": epochs}
    if batch_size:
        config["batch_size"] = batch_size
    if lr:
        config.update(lr_generator=lr, lr_critic=lr)
    connect(settings)
    summary = train_gan_model(
        settings, data, gpus_per_worker=gpus, model_config=config, run_name=name, log=console.print
    )
    report = summary.report
    print_summary(
        "Trained",
        {
            "model": f"{summary.registered_model} version {summary.version} (alias challenger)",
            "TSTR / TRTR": f"{report['tstr']['ratio']:.4f} "
            f"({report['tstr']['tstr_auc']:.4f} / {report['tstr']['trtr_auc']:.4f} ROC-AUC)",
            "mean KS / TVD": f"{report['columns']['mean'].get('ks', float('nan')):.4f} / "
            f"{report['columns']['mean'].get('tvd', float('nan')):.4f}",
            "DCR median ratio": f"{report['dcr']['median_ratio']:.3f}",
            "MLflow run": summary.run_id,
            "took": f"{summary.seconds:.1f} s (best epoch {summary.epochs})",
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
    """Run the model's protocol and print the table: next item (leave-one-out; sampled and full ranking)
    on interactions, purchase (last snapshot day) on a training set."""
    from shopsight.training.evaluate import evaluate_model_uri, evaluate_purchase_uri

    settings = state(ctx).settings
    if _is_training_set(data):
        rows = evaluate_purchase_uri(settings, model_uri, data)
        table = Table(title=f"Purchase protocol on {data.name} (last snapshot day)", title_justify="left")
        table.add_column("model")
        keys = ("roc_auc", "pr_auc", "log_loss", "precision", "recall", "f1")
        for column in ("rows", "ROC-AUC", "PR-AUC", "log-loss", "precision", "recall", "F1"):
            table.add_column(column, justify="right")
        for name, m in rows.items():
            table.add_row(name, f"{int(m['n']):,}", *(f"{m[k]:.4f}" for k in keys))
        console.print(table)
        return
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
