"""`shopsight data`: simulate events and validate event files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from shopsight.cli._context import input_path, one_input, parse_day, state
from shopsight.data import (
    ACTIVITY_PROFILES,
    FORMATS,
    EventReader,
    EventStats,
    ReadReport,
    SimulationResult,
    SimulatorConfig,
    TimeWindow,
    continue_simulation,
    parse_shift,
    quarantine_file,
    simulate,
)
from shopsight.data.schema import BEHAVIORS, TAOBAO_BEHAVIOR_MIX
from shopsight.platform import Settings, ShopsightError, Stopwatch, console, print_summary, progress_bar

app = typer.Typer(help="Event data: simulate Taobao-like events, validate event files.", no_args_is_help=True)

FormatName = Literal[FORMATS]  # type: ignore[valid-type]
FORMAT_HELP = "The event file's format (auto: decided from its content)."


@app.command("simulate")
def simulate_command(
    ctx: typer.Context,
    out: Annotated[
        Path | None, typer.Option(help="Output folder.", show_default="<data_dir>/simulated")
    ] = None,
    users: Annotated[int, typer.Option(min=1, help="Number of users.")] = 2000,
    days: Annotated[int, typer.Option(min=1, help="Number of days.")] = 9,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same events.")] = 0,
    start: Annotated[str, typer.Option(help="First day, YYYY-MM-DD (shop-local).")] = "2017-11-25",
    items: Annotated[
        int | None, typer.Option(min=1, help="Number of items.", show_default="4 per user")
    ] = None,
    activity: Annotated[
        Literal["taobao", "heavy"],  # the keys of ACTIVITY_PROFILES
        typer.Option(
            help="How active users are: taobao (Taobao's spread, a median of 62 events a user in 9 days) or "
            "heavy (a shop's best customers: several sessions a day, a median of about 320 events).",
        ),
    ] = "taobao",
    continue_days: Annotated[
        int | None,
        typer.Option(
            "--continue",
            min=1,
            metavar="DAYS",
            help="Go on: add DAYS days to the simulation in --out, for the same users and items, from where "
            "it stopped (its users, seed and days come from it).",
        ),
    ] = None,
    shift: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KEY=VALUE",
            help="With --continue: change a behavioural constant on the new days only, as injected drift "
            "(repeatable), e.g. p_cart=0.15, intent_bias=-0.8, mean_session_views=12.",
        ),
    ] = None,
) -> None:
    """Simulate Taobao-like behaviour events as day-partitioned parquet, with the next-day buy oracle;
    --continue extends an earlier simulation by more days."""
    settings = state(ctx).settings
    out = out or settings.data_dir / "simulated"
    if continue_days is not None:
        decided = ("users", "days", "seed", "start", "items", "activity")
        given = [name for name in decided if _given(ctx, name)]
        if given:
            raise typer.BadParameter(
                "cannot be given with --continue: the saved simulation decides it", param_hint=f"--{given[0]}"
            )
        try:
            shifted = parse_shift(shift or [])
        except ShopsightError as exc:  # a bad value on the command line is a usage error
            raise typer.BadParameter(str(exc), param_hint="--shift") from None
        result = run_continuation(out, continue_days, shifted)
        print_mix("Behaviour mix (new days)", result.behavior_mix)
        print_continuation_summary(result, shifted)
        return
    if shift:
        raise typer.BadParameter(
            "only with --continue: a shift acts on the days a continuation adds", param_hint="--shift"
        )
    cfg = SimulatorConfig(
        users=users,
        days=days,
        seed=seed,
        start=parse_day(start, "--start"),
        items=items,
        timezone=settings.data.timezone,
        **ACTIVITY_PROFILES[activity],
    )
    result = run_simulation(cfg, out)
    print_mix("Behaviour mix", result.behavior_mix)
    print_simulation_summary(result)


@app.command("validate")
def validate_command(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Event file (.csv, .csv.gz, .txt, .parquet) or day-partitioned folder.",
            callback=input_path,
            show_default=False,
        ),
    ] = None,
    path: Annotated[
        Path | None,
        typer.Argument(help="The same as --data (the older spelling).", hidden=True, callback=input_path),
    ] = None,
    format: Annotated[FormatName, typer.Option("--format", help=FORMAT_HELP)] = "auto",
    quarantine: Annotated[
        Path | None,
        typer.Option(
            help="Where rejected rows go.", show_default="<data_dir>/quarantine/<name>.rejected.csv"
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="First accepted day.", show_default="data.window_start")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Last accepted day.", show_default="data.window_end")
    ] = None,
    window: Annotated[
        bool,
        typer.Option(
            "--window/--no-window", help="Accept only events between --since and --until (else any time)."
        ),
    ] = True,
    strict: Annotated[
        bool, typer.Option("--strict/--no-strict", help="Exit with status 1 if any row is rejected.")
    ] = False,
) -> None:
    """Check every row of an event file; count and quarantine the bad ones, summarise the good ones.

    The file is --data PATH, or the command's argument: `data validate events.csv`.
    """
    settings = state(ctx).settings
    path = one_input(data, path)
    accepted = _window(settings, since, until) if window else None
    quarantine = quarantine or quarantine_file(settings.data_dir / "quarantine", path)
    report, stats, seconds = validate_events(path, format, accepted, quarantine, settings.data.batch_rows)
    print_validation(report, stats, accepted, seconds)
    if strict and report.rows_rejected:
        raise typer.Exit(1)


def validate_events(
    path: Path, format: str, window: TimeWindow | None, quarantine: Path | None, batch_rows: int
) -> tuple[ReadReport, EventStats, float]:
    """Read every row with a progress bar; returns the reader's report, statistics and seconds taken."""
    watch = Stopwatch()
    reader = EventReader(path, format, window=window, quarantine=quarantine, batch_rows=batch_rows)
    stats = EventStats()
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"validating {path.name} ({reader.format})", total=None)
        for table in reader:
            stats.update(table)
            bar.update(task, completed=reader.report.rows_read)
    return reader.report, stats, watch.seconds


def run_simulation(cfg: SimulatorConfig, out: Path, transient: bool = False) -> SimulationResult:
    with progress_bar(transient=transient) as bar:
        task = bar.add_task(f"simulating {cfg.users:,} users x {cfg.days} days", total=cfg.users)
        return simulate(cfg, out, on_progress=lambda done, _total: bar.update(task, completed=done))


def run_continuation(out: Path, days: int, shift: dict[str, float]) -> SimulationResult:
    with progress_bar() as bar:
        task = bar.add_task(f"continuing {out} by {days} day{'s' if days > 1 else ''}", total=None)
        return continue_simulation(
            out, days, shift, on_progress=lambda done, total: bar.update(task, completed=done, total=total)
        )


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option was given (command line or environment), not left at its default. By name: typer
    may carry its own click, whose ParameterSource is another enum."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def print_mix(title: str, mix: dict[str, float], extra: dict[str, dict[str, float]] | None = None) -> None:
    """The behaviour mix beside the real Taobao dataset's."""
    columns = {title: mix, **(extra or {}), "Taobao (100M events)": TAOBAO_BEHAVIOR_MIX}
    table = Table(title="Behaviour mix (% of events)", title_justify="left")
    table.add_column("behavior", style="cyan")
    for name in columns:
        table.add_column(name, justify="right")
    for b in BEHAVIORS:
        table.add_row(b, *(f"{values[b]:.2f}" for values in columns.values()))
    console.print(table)


def print_simulation_summary(result: SimulationResult) -> None:
    print_summary(
        "Simulated",
        {
            "events": f"{result.events:,} ({result.events / max(result.seconds, 1e-9):,.0f} events/s)",
            "users x days": f"{result.users:,} x {len(result.days)} ({result.days[0]} .. {result.days[-1]})",
            "written to": f"{result.out}/events ({result.files} parquet files, by day)",
            "oracle": f"{result.out}/truth/next_day_buy.parquet",
            "took": f"{result.seconds:.1f} s",
        },
    )


def print_continuation_summary(result: SimulationResult, shift: dict[str, float]) -> None:
    print_summary(
        "Continued",
        {
            "days added": f"{len(result.days)} ({result.days[0]} .. {result.days[-1]})",
            "users": f"{result.users:,}",
            "events": f"{result.events:,} ({result.events / max(result.seconds, 1e-9):,.0f} events/s)",
            "shift": ", ".join(f"{k}={v:g}" for k, v in shift.items()) or "none",
            "written to": f"{result.out}/events ({result.files} new parquet files, by day)",
            "oracle": f"{result.out}/truth/next_day_buy.parquet",
            "took": f"{result.seconds:.1f} s",
        },
    )


def print_validation(
    report: ReadReport, stats: EventStats, window: TimeWindow | None, seconds: float
) -> None:
    if report.rejected:
        table = Table(title="Rejected rows", title_justify="left")
        table.add_column("reason", style="red")
        table.add_column("rows", justify="right")
        for reason, count in report.rejected.most_common():
            table.add_row(reason, f"{count:,}")
        console.print(table)
    print_mix(f"{report.path.name}", stats.behavior_mix)
    q = stats.events_per_user_quantiles()
    print_summary(
        f"Validated {report.path} ({report.format})",
        {
            "rows read": f"{report.rows_read:,}",
            "good rows": f"{report.rows_good:,}",
            "rejected rows": f"{report.rows_rejected:,}"
            + (f" -> {report.quarantine_path}" if report.quarantine_path else ""),
            **report.notes,  # blank lines, warnings such as a truncated gzip
            "window": str(window) if window else "any time",
            "users / items / categories": (
                f"{stats.users:,} / {len(stats.items):,} / {len(stats.categories):,}"
            ),
            "events a user (median, p90, p99)": f"{q[0.5]:.0f}, {q[0.9]:.0f}, {q[0.99]:.0f}",
            "users who buy": f"{100 * stats.buyer_share:.1f}%",
            "time range": f"{stats.first_ts} .. {stats.last_ts}",
            "took": f"{seconds:.1f} s",
        },
    )


def _window(settings: Settings, since: str | None, until: str | None) -> TimeWindow:
    first = parse_day(since, "--since") if since else settings.data.window_start
    last = parse_day(until, "--until") if until else settings.data.window_end
    if last < first:
        raise typer.BadParameter(f"{last} is before {first}", param_hint="--until")
    return TimeWindow.from_days(first, last, settings.data.timezone)
