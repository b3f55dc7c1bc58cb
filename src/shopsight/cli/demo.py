"""`shopsight demo`: the whole pipeline on the embedded default, stage after stage."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer

from shopsight.cli._context import state
from shopsight.cli.data import run_simulation, validate_events
from shopsight.data import SimulatorConfig, TimeWindow
from shopsight.data.schema import TAOBAO_BEHAVIOR_MIX
from shopsight.platform import Stopwatch, console, note, print_summary, steps_bar
from shopsight.platform._logs import log_file


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
    from shopsight.cli.features import run_build
    from shopsight.features import store

    settings = state(ctx).settings
    watch = Stopwatch()
    out = settings.data_dir / "demo" / "simulated"
    stages = 9

    def stage(number: int, title: str) -> None:
        console.rule(f"[bold]{number}/{stages} {title}", align="left")

    stage(1, "data: simulate Taobao-like events")
    cfg = SimulatorConfig(users=users, days=days, seed=seed, timezone=settings.data.timezone)
    result = run_simulation(cfg, out, transient=True)
    console.print(
        f"{result.events:,} events of {result.users:,} users, {result.days[0]} .. {result.days[-1]}, "
        f"in {result.out}/events ({result.seconds:.1f} s)"
    )

    stage(2, "data: validate the events against the contract")
    last_day = cfg.start + timedelta(days=days - 1)
    window = TimeWindow.from_days(cfg.start, last_day, cfg.timezone)
    quarantine = settings.data_dir / "demo" / "quarantine" / "simulated.rejected.csv"
    report, stats, seconds = validate_events(
        out / "events", "parquet", window, quarantine, settings.data.batch_rows
    )
    mix = stats.behavior_mix
    console.print(
        f"{report.rows_read:,} rows read, {report.rows_rejected:,} rejected ({seconds:.1f} s); "
        f"{stats.users:,} users, {len(stats.items):,} items"
    )
    shares = ", ".join(f"{b} {share:.2f}" for b, share in mix.items())
    taobao = ", ".join(f"{b} {share:.2f}" for b, share in TAOBAO_BEHAVIOR_MIX.items())
    console.print(f"behaviour mix, % of events: {shares} (Taobao {taobao})")

    stage(3, "features: Spark feature jobs")
    # every day gets a snapshot; training sets stop the day before the last, whose labels the last day
    # gives, and the last day's features are what serving answers with (a replay of that day)
    build = run_build(settings, out / "events", cfg.start, last_day, brief=True)

    stage(4, "features: register in Feast and materialise online")
    applied = store.apply(settings)
    with steps_bar("materialising") as progress:
        views = store.materialize(settings, on_view=progress)
    console.print(
        f"{len(applied)} feature views and services registered; {len(views)} views materialised into the "
        f"{settings.feast.online_store} online store"
    )
    user = int(stats.events_per_user.most_common(1)[0][0])
    online = store.online_features(settings, "user_profile_v1", [{"user_id": user}])
    shown = ", ".join(f"{k} {online[k][0]}" for k in ("n_pv_7d", "n_buy_7d", "segment_id") if k in online)
    console.print(f"user {user} online (user_profile_v1): {shown}, ...")

    stage(5, "training: SASRec next item (Ray Train, MLflow)")
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
        log=_brief,
    )
    popularity = trained.baselines["popularity"]
    console.print(
        f"{trained.registered_model} v{trained.version} (challenger): "
        f"test HR@10 {trained.test['hr@10']:.3f}, "
        f"full ranking {trained.test['hr@10_full']:.3f} (popularity {popularity['hr@10']:.3f} / "
        f"{popularity['hr@10_full']:.3f})"
    )

    from shopsight.training.binary.train import train_snapshot_model
    from shopsight.training.tasks import served_tasks

    snapshot_tasks = [t for t in served_tasks() if t.route.predictor == "probability"]
    trained_snapshots = {}
    for number, task in enumerate(snapshot_tasks, 6):
        service = task.data.source
        shown = {"sasrec": "SASRec", "lstm": "LSTM"}.get(task.default_model, task.default_model)
        stage(number, f"training: {shown} {task.name} ({task.data.label}), a point-in-time set from Feast")
        training_set = settings.data_dir / "demo" / f"training_set_{task.name}.parquet"
        with steps_bar(f"point-in-time training set of {service}") as progress:
            store.training_set(
                settings,
                service,
                cfg.start,
                last_day - timedelta(days=1),
                training_set,
                label=task.data.label,
                on_view=progress,
            )
        summary = train_snapshot_model(
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
            log=_brief,
        )
        trained_snapshots[task.name] = summary
        baselines = ", ".join(f"{b} {r['roc_auc']:.3f}" for b, r in summary.baselines.items())
        console.print(
            f"{summary.registered_model} v{summary.version} (challenger): test ROC-AUC "
            f"{summary.test['roc_auc']:.3f} ({baselines}), ECE {summary.test['ece']:.3f} "
            f"(uncalibrated {summary.test['ece_uncalibrated']:.3f})"
        )

    stage(stages - 1, "serving: the champions on Ray Serve (live Feast features, MLflow by alias)")
    from shopsight.cli.serve import demo_serving, stop_serving
    from shopsight.monitoring.monitor import end_of_day

    top_users = [int(u) for u, _ in stats.events_per_user.most_common(3)]
    # a replay: the answers describe the end of the last simulated day, whose features serving reads, so
    # that the next simulated day tells what followed them; the replicas roll their log every 2 s
    replay = {"as_of": end_of_day(last_day.isoformat(), cfg.timezone), "prediction_log_roll_s": 2.0}
    serving, served = demo_serving(settings, top_users, **replay)

    stage(stages, "monitoring: a canary, the next day simulated, the answers judged on what followed")
    from shopsight.cli.demo_loop import close_the_loop

    monitored = close_the_loop(
        served, out, last_day, users=cfg.users, purchase_epochs=max(2, purchase_epochs // 2), log=_brief
    )
    print_summary(
        "Demo finished",
        {
            "events": f"{result.events:,} in {out / 'events'} ({report.rows_rejected:,} rejected)",
            "features": f"{sum(build.rows.values()):,} rows in {build.out}",
            "feature store": f"{settings.data_dir / 'feast'} ({settings.feast.online_store} online)",
            "models": ", ".join(
                f"{s.registered_model} v{s.version}" for s in [trained, *trained_snapshots.values()]
            )
            + " (evaluation reports in their MLflow runs)",
            "MLflow UI": tracking_uri(settings),
            **serving,
            **monitored,
            "logs": str(log_file() or "on the console (-v)"),
            "took": f"{watch.seconds:.0f} s",
        },
    )
    stop_serving(settings, keep_serving)


def _brief(text: str) -> None:
    """The demo's log of a training run: its one-line notes; the evaluation report (many lines) is in the
    run's artifacts, and the stage prints its numbers in one line."""
    if "\n" not in text.strip():
        note(text)
