"""`shopsight demo`: the whole pipeline on the embedded default, stage after stage."""

from __future__ import annotations

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
) -> None:
    """Run the pipeline end to end on this machine: simulate events, validate them, summarise."""
    settings = state(ctx).settings
    watch = Stopwatch()
    out = settings.data_dir / "demo" / "simulated"

    console.rule("[bold]1. data: simulate Taobao-like events")
    cfg = SimulatorConfig(users=users, days=days, seed=seed, timezone=settings.data.timezone)
    result = run_simulation(cfg, out)
    print_simulation_summary(result)

    console.rule("[bold]2. data: validate the events against the contract")
    window = TimeWindow.from_days(
        cfg.start, cfg.start.fromordinal(cfg.start.toordinal() + days - 1), cfg.timezone
    )
    quarantine = settings.data_dir / "demo" / "quarantine" / "simulated.rejected.csv"
    report, stats, seconds = validate_events(
        out / "events", "parquet", window, quarantine, settings.data.batch_rows
    )
    print_validation(report, stats, window, seconds)

    print_summary(
        "Demo finished",
        {
            "events": f"{result.events:,} in {out / 'events'}",
            "rejected rows": f"{report.rows_rejected:,}",
            "next stages": "features, training, serving arrive with the next issues",
            "took": f"{watch.seconds:.1f} s",
        },
    )
