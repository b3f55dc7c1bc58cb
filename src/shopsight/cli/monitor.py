"""`shopsight monitor`: the served models judged on what followed their answers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table
from rich.text import Text

from shopsight.cli._context import input_path, state
from shopsight.cli._output import OutputOption, emit
from shopsight.platform import ShopsightError, console, err_console, print_summary

ALERT_EXIT = 3  # distinct from 1 (an error) and 2 (a usage error): a script can tell "it ran and found"


def monitor_command(
    ctx: typer.Context,
    day: Annotated[
        str | None,
        typer.Option(help="The answers made on this shop-local day, YYYY-MM-DD (a replay: as of its end)."),
    ] = None,
    start: Annotated[
        str | None, typer.Option(help="Answers as of this time or later (ISO 8601; UTC unless it says).")
    ] = None,
    end: Annotated[str | None, typer.Option(help="Answers as of before this time (ISO 8601).")] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="The events that followed the answers: a folder of event parquet, or a simulation folder.",
            show_default="<data_dir>/simulated",
            callback=input_path,
        ),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(help="A task to monitor (repeatable).", show_default="every served task"),
    ] = None,
    observed_until: Annotated[
        str | None,
        typer.Option(
            help="The end of what the events have observed (ISO 8601).", show_default="the latest event"
        ),
    ] = None,
    on_alert: Annotated[
        Literal["nothing", "retrain"],
        typer.Option(
            help="retrain: submit a training job (`jobs submit train`) for each task with an alert."
        ),
    ] = "nothing",
    track: Annotated[
        bool, typer.Option("--track/--no-track", help="Record the results as a run in MLflow.")
    ] = True,
    output: OutputOption = "table",
) -> None:
    """Join the logged answers of a window with the events that followed, and report per task and model
    version: online metrics with 95% intervals, challenger against champion, feature drift and
    training-serving skew. Exits 3 when a threshold (`monitoring.*`) is breached, one line per breach."""
    from shopsight.monitoring.monitor import run

    settings = state(ctx).settings
    window_start, window_end = window(settings, day, start, end)
    events = data or settings.data_dir / "simulated"
    say = (lambda line: err_console.print(f"[dim]{line}[/dim]")) if output == "table" else (lambda _: None)
    report = run(
        settings,
        events=events,
        start=window_start,
        end=window_end,
        tasks=task,
        observed_until=_time(observed_until, "--observed-until"),
        track=track,
        say=say,
    )
    data = report.as_dict()
    emit(output, data, lambda: _people(report))
    if output == "table":
        _summary(report)
    for line in report.alerts:  # one line each, whatever the terminal's width: scripts grep them
        err_console.print(Text.assemble(("alert: ", "red"), line), soft_wrap=True)
    if report.alerts and on_alert == "retrain":
        _retrain(settings, report)
    if report.alerts:
        raise typer.Exit(ALERT_EXIT)


def window(settings, day: str | None, start: str | None, end: str | None) -> tuple:
    """The window of answers that --day, or --start and --end, name."""
    from shopsight.monitoring.monitor import day_window

    if day and (start or end):
        raise typer.BadParameter("give --day, or --start/--end, not both", param_hint="--day")
    if day:
        try:
            return day_window(day, settings.data.timezone)
        except ValueError:
            raise typer.BadParameter(f"{day!r} is not a day (YYYY-MM-DD)", param_hint="--day") from None
    return _time(start, "--start"), _time(end, "--end")


def _time(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time", param_hint=option) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _people(report) -> list:
    shown = []
    for task in report.tasks:
        table = Table(title=f"{task.task}: online metrics (95% bootstrap interval)", title_justify="left")
        names = sorted({n for v in task.versions for n in v.metrics}, key=lambda n: n != task.primary)
        for column in ("version", "alias", "answers", "labelled", "pending", "unseen", *names):
            table.add_column(column, justify="left" if column in ("version", "alias") else "right")
        oracle = any(v.oracle for v in task.versions)
        if oracle:
            table.add_column("oracle roc_auc", justify="right")
        for v in task.versions:
            cells = [
                f"{v.metrics[n].value:.4f} [{v.metrics[n].lo:.4f}, {v.metrics[n].hi:.4f}]"
                if n in v.metrics
                else "-"
                for n in names
            ]
            extra = [f"{v.oracle['roc_auc']:.4f}" if "roc_auc" in v.oracle else "-"] if oracle else []
            table.add_row(
                v.version,
                v.alias,
                str(v.answers),
                str(v.labelled),
                str(v.pending),
                str(v.unseen),
                *cells,
                *extra,
            )
        shown.append(table)
        for c in task.comparisons:
            how = "paired: the same requests" if c.paired else "two groups of requests"
            shown.append(
                f"  {c.alias} v{c.version} - champion v{c.champion_version}, {c.metric}: "
                f"{c.difference.value:+.4f} [{c.difference.lo:+.4f}, {c.difference.hi:+.4f}] "
                f"({how}, {c.units})"
            )
        if task.drift:
            worst = ", ".join(f"{d.feature} PSI {d.psi:.3f} KS {d.ks:.3f}" for d in task.drift[:5])
            shown.append(f"  most drifted features: {worst}")
        if task.skew:
            skewed = [s for s in task.skew if s.mismatch_rate > 0]
            shown.append(
                "  training-serving skew: "
                + (
                    ", ".join(f"{s.feature} {s.mismatch_rate:.1%}" for s in skewed[:5])
                    if skewed
                    else f"none in {task.skew[0].compared} answers recomputed offline"
                )
            )
        shown += [f"  [dim]{note}[/dim]" for note in task.notes]
    return shown


def _summary(report) -> None:
    rows = {"alerts": str(len(report.alerts))}
    if report.run_id:
        rows["MLflow run"] = report.run_url or report.run_id
    if report.html_path:
        rows["report"] = str(report.html_path)
    print_summary("monitored", rows)


def _retrain(settings, report) -> None:
    """Submit `train` for each task with an alert: the champion's model family on its training data."""
    from shopsight.lifecycle.registry import alias_version, registry_client, version_info
    from shopsight.platform.jobs import submit
    from shopsight.platform.ray_cluster import jobs_endpoint
    from shopsight.training.tasks import get_task

    client = registry_client(settings)
    local_cluster = not settings.ray.address
    for name in sorted({line.split(":", 1)[0] for line in report.alerts}):
        task = get_task(name)
        version = alias_version(client, task.registered_model, "champion")
        info = version_info(client, task.registered_model, version) if version else None
        data = info.dataset.get("dataset.path") if info else None
        if not data or not info.model_type:
            err_console.print(f"[red]{name}: no champion with recorded training data to retrain from[/red]")
            continue
        args = ["--task", task.name, "--model", info.model_type, "--data", data]
        try:
            submission = submit(jobs_endpoint(settings), "train", args, settings, local_cluster=local_cluster)
        except ShopsightError as exc:
            err_console.print(f"[red]{name}: the retrain job was not submitted: {exc}[/red]")
            continue
        # one line whatever the terminal's width, like the alerts: scripts read the job id and command
        line = f"{name}: retrain submitted as {submission.job_id} ({submission.entrypoint})"
        console.print(line, soft_wrap=True, markup=False)
