"""`shopsight demo`: the whole pipeline on the embedded default, stage after stage."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer

from shopsight.cli._context import state
from shopsight.cli.data import print_simulation_summary, print_validation, run_simulation, validate_events
from shopsight.data import SimulatorConfig, TimeWindow
from shopsight.platform import Stopwatch, console, err_console, print_summary


def demo(
    ctx: typer.Context,
    users: Annotated[int, typer.Option(min=1, help="Simulated users.")] = 2000,
    days: Annotated[int, typer.Option(min=2, help="Simulated days.")] = 9,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    train_epochs: Annotated[int, typer.Option(min=1, help="Epochs of the demo's next-item model.")] = 10,
    purchase_epochs: Annotated[
        int, typer.Option(min=1, help="Epochs of each model on user snapshots (purchase, churn).")
    ] = 6,
    keep_serving: Annotated[
        bool,
        typer.Option(
            "--keep-serving/--no-keep-serving",
            help="Keep the served models up until Ctrl-C instead of stopping at the end.",
        ),
    ] = False,
) -> None:
    """Run the pipeline end to end on this machine: simulate and validate events, build features,
    register and materialise them in Feast, look one user up online, train and register a model of every
    served task (next item, and the tasks on user snapshots: purchase, churn), each beside its baselines,
    then serve the champions with Ray Serve and send them a few requests."""
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
    with err_console.status("materialising"):
        store.materialize(settings)
    from shopsight.cli.features import list_command

    list_command(ctx)
    user = int(stats.events_per_user.most_common(1)[0][0])
    console.print(f"Online features of user {user} (feature service user_profile_v1):")
    print_online(store.online_features(settings, "user_profile_v1", [{"user_id": user}]))

    console.rule("[bold]5. training: SASRec next-item model (Ray Train, tracked and registered in MLflow)")
    from shopsight.platform.mlflow_server import tracking_uri
    from shopsight.platform.ray_cluster import connect
    from shopsight.training.next_item.train import train_next_item_model
    from shopsight.training.runtime.loop import LoopConfig

    connect(settings)
    trained = train_next_item_model(
        settings,
        "sasrec",
        out / "events",
        model_config={"max_len": 50, "d_model": 48, "n_heads": 2, "dropout": 0.2},
        loop=LoopConfig(epochs=train_epochs, eval_every=5, batch_size=128, lr=2e-3),
        log=console.print,
    )

    from shopsight.training.binary.train import train_snapshot_model
    from shopsight.training.tasks import served_tasks

    snapshot_tasks = [t for t in served_tasks() if t.route.predictor == "probability"]
    trained_snapshots = {}
    for number, task in enumerate(snapshot_tasks, 6):
        service = task.data.source
        shown = {"sasrec": "SASRec", "lstm": "LSTM"}.get(task.default_model, task.default_model)
        console.rule(
            f"[bold]{number}. training: {shown} {task.name} model ({task.data.label}) on a point-in-time "
            "training set from Feast"
        )
        training_set = settings.data_dir / "demo" / f"training_set_{task.name}.parquet"
        with err_console.status(f"point-in-time training set of {service}"):
            store.training_set(
                settings,
                service,
                cfg.start,
                last_day - timedelta(days=1),
                training_set,
                label=task.data.label,
            )
        trained_snapshots[task.name] = train_snapshot_model(
            settings,
            task,
            task.default_model,
            training_set,
            model_config={"d_model": 48, "dropout": 0.2}
            | ({"n_heads": 2} if task.default_model == "sasrec" else {}),
            loop=LoopConfig(
                epochs=purchase_epochs, batch_size=256, eval_every=1, patience=3, weight_decay=1e-5
            ),
            truth=out / "truth" / task.code.ORACLE_FILE,
            log=console.print,
        )

    console.rule(
        f"[bold]{6 + len(snapshot_tasks)}. serving: the champions on Ray Serve (live Feast features, "
        "MLflow by alias)"
    )
    from shopsight.cli.serve import demo_serving, stop_serving

    top_users = [int(u) for u, _ in stats.events_per_user.most_common(3)]
    popularity = trained.baselines["popularity"]
    serving = demo_serving(settings, top_users)
    snapshot_rows = {}
    for name, summary in trained_snapshots.items():
        baselines = ", ".join(f"{b} {r['roc_auc']:.3f}" for b, r in summary.baselines.items())
        snapshot_rows[f"{name} model"] = f"{summary.registered_model} v{summary.version} (alias challenger)"
        snapshot_rows[f"{name} test ROC-AUC"] = f"{summary.test['roc_auc']:.3f} ({baselines})"
        snapshot_rows[f"{name} test PR-AUC"] = (
            f"{summary.test['pr_auc']:.3f} (base rate {summary.test['base_rate']:.3f})"
        )
        snapshot_rows[f"{name} calibration"] = (
            f"ECE {summary.test['ece']:.3f} (before calibration {summary.test['ece_uncalibrated']:.3f}), "
            f"mean probability {summary.test['mean_probability']:.3f}"
        )

    print_summary(
        "Demo finished",
        {
            "events": f"{result.events:,} in {out / 'events'}",
            "rejected rows": f"{report.rows_rejected:,}",
            "features": f"{sum(build.rows.values()):,} rows in {build.out}",
            "feature store": f"{settings.data_dir / 'feast'} ({settings.feast.online_store} online store)",
            "next-item model": f"{trained.registered_model} v{trained.version} (alias challenger)",
            "test HR@10 sampled / full": f"{trained.test['hr@10']:.3f} / {trained.test['hr@10_full']:.3f} "
            f"(popularity {popularity['hr@10']:.3f} / {popularity['hr@10_full']:.3f})",
            **snapshot_rows,
            "MLflow UI": tracking_uri(settings),
            **serving,
            "took": f"{watch.seconds:.1f} s",
        },
    )
    stop_serving(settings, keep_serving)
