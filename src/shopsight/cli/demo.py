"""`shopsight demo`: the whole pipeline on the embedded default, stage after stage."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer

from shopsight.cli._context import state
from shopsight.cli.data import print_simulation_summary, print_validation, run_simulation, validate_events
from shopsight.data import SimulatorConfig, TimeWindow
from shopsight.platform import Stopwatch, console, print_summary


def demo(
    ctx: typer.Context,
    users: Annotated[int, typer.Option(min=1, help="Simulated users.")] = 2000,
    days: Annotated[int, typer.Option(min=2, help="Simulated days.")] = 9,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    train_epochs: Annotated[int, typer.Option(min=1, help="Epochs of the demo's next-item model.")] = 10,
    purchase_epochs: Annotated[int, typer.Option(min=1, help="Epochs of the demo's purchase model.")] = 6,
    keep_serving: Annotated[
        bool, typer.Option(help="Keep the served models up until Ctrl-C instead of stopping at the end.")
    ] = False,
) -> None:
    """Run the pipeline end to end on this machine: simulate and validate events, build features,
    register and materialise them in Feast, look one user up online, train and register a next-item
    model and a purchase model, each beside its baselines, then serve the champions with Ray Serve and
    send them a few requests."""
    from shopsight.cli.features import print_online, run_build
    from shopsight.features import store

    settings = state(ctx).settings
    watch = Stopwatch()
    out = settings.data_dir / "demo" / "simulated"

    console.rule("[bold]1. data: simulate Taobao-like events")
    cfg = SimulatorConfig(users=users, days=days, seed=seed, timezone=settings.data.timezone)
    result = run_simulation(cfg, out)
    print_simulation_summary(result)

    console.rule("[bold]2. data: validate the events against the contract")
    last_day = cfg.start + timedelta(days=days - 1)
    window = TimeWindow.from_days(cfg.start, last_day, cfg.timezone)
    quarantine = settings.data_dir / "demo" / "quarantine" / "simulated.rejected.csv"
    report, stats, seconds = validate_events(
        out / "events", "parquet", window, quarantine, settings.data.batch_rows
    )
    print_validation(report, stats, window, seconds)

    console.rule("[bold]3. features: Spark feature jobs")
    # every day but the last gets a snapshot; the last day provides the last snapshot's labels
    build = run_build(settings, out / "events", cfg.start, last_day - timedelta(days=1))

    console.rule("[bold]4. features: register in Feast and materialise online")
    store.apply(settings)
    with console.status("materialising"):
        store.materialize(settings)
    from shopsight.cli.features import list_command

    list_command(ctx)
    user = int(stats.events_per_user.most_common(1)[0][0])
    console.print(f"Online features of user {user} (feature service user_profile_v1):")
    print_online(store.online_features(settings, "user_profile_v1", [{"user_id": user}]))

    console.rule("[bold]5. training: SASRec next-item model (Ray Train, tracked and registered in MLflow)")
    from shopsight.platform.mlflow_server import tracking_uri
    from shopsight.platform.ray_cluster import connect
    from shopsight.training.loop import LoopConfig
    from shopsight.training.train import train_next_item_model

    connect(settings)
    trained = train_next_item_model(
        settings,
        "sasrec",
        out / "events",
        model_config={"max_len": 50, "d_model": 48, "n_heads": 2, "dropout": 0.2},
        loop=LoopConfig(epochs=train_epochs, eval_every=5, batch_size=128, lr=2e-3),
        log=console.print,
    )

    console.rule("[bold]6. training: SASRec purchase model on a point-in-time training set from Feast")
    from shopsight.training.train_purchase import SERVICE, train_purchase_model

    training_set = settings.data_dir / "demo" / "training_set.parquet"
    with console.status(f"point-in-time training set of {SERVICE}"):
        store.training_set(settings, SERVICE, cfg.start, last_day - timedelta(days=1), training_set)
    purchase = train_purchase_model(
        settings,
        "sasrec",
        training_set,
        model_config={"d_model": 48, "n_heads": 2, "dropout": 0.2},
        loop=LoopConfig(epochs=purchase_epochs, batch_size=256, eval_every=1, patience=3, weight_decay=1e-5),
        truth=out / "truth" / "next_day_buy.parquet",
        log=console.print,
    )
    baselines = ", ".join(f"{name} {r['roc_auc']:.3f}" for name, r in purchase.baselines.items())
    buy_rate = purchase.test["base_rate"]

    console.rule("[bold]7. serving: the champions on Ray Serve (live Feast features, MLflow by alias)")
    from shopsight.cli.serve import demo_serving, stop_serving

    top_users = [int(u) for u, _ in stats.events_per_user.most_common(3)]
    serving = demo_serving(settings, top_users, [trained.registered_model, purchase.registered_model])

    print_summary(
        "Demo finished",
        {
            "events": f"{result.events:,} in {out / 'events'}",
            "rejected rows": f"{report.rows_rejected:,}",
            "features": f"{sum(build.rows.values()):,} rows in {build.out}",
            "feature store": f"{settings.data_dir / 'feast'} ({settings.feast.online_store} online store)",
            "next-item model": f"{trained.registered_model} v{trained.version} (alias challenger)",
            "test HR@10 sampled / full": f"{trained.test['hr@10']:.3f} / {trained.test['hr@10_full']:.3f} "
            f"(popularity {trained.popularity['hr@10']:.3f} / {trained.popularity['hr@10_full']:.3f})",
            "purchase model": f"{purchase.registered_model} v{purchase.version} (alias challenger)",
            "purchase test ROC-AUC": f"{purchase.test['roc_auc']:.3f} ({baselines})",
            "purchase test PR-AUC": f"{purchase.test['pr_auc']:.3f} (buy rate {buy_rate:.3f})",
            "MLflow UI": tracking_uri(settings),
            **serving,
            "next stages": "clusters arrive with the next issues",
            "took": f"{watch.seconds:.1f} s",
        },
    )
    stop_serving(settings, keep_serving)
