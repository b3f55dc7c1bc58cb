"""`shopsight features`: build features with Spark, manage the Feast repository, look features up."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shopsight.cli._context import (
    input_path,
    model_uri_option,
    one_input,
    parse_day,
    renamed_options,
    state,
)
from shopsight.cli._output import OutputOption, emit
from shopsight.cli.data import FORMAT_HELP, FormatName
from shopsight.platform import (
    Settings,
    Stopwatch,
    console,
    err_console,
    print_summary,
    progress_bar,
    steps_bar,
)

app = typer.Typer(
    help="Build Spark features, manage the Feast repository (apply, materialize, list, describe), "
    "training sets, the feature server and pushes.",
    no_args_is_help=True,
)


# --events was the input's name before every command called it --data
@app.command("build", cls=renamed_options(events="data"))
def build_command(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Option(help="Events: a day-partitioned parquet folder or a Taobao CSV.", callback=input_path),
    ],
    start: Annotated[str, typer.Option(help="First snapshot day, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option(help="Last snapshot day, YYYY-MM-DD (inclusive).")],
    format: Annotated[FormatName, typer.Option("--format", help=FORMAT_HELP)] = "auto",
    out: Annotated[
        Path | None, typer.Option(help="Output folder.", show_default="<data_dir>/features")
    ] = None,
) -> None:
    """Compute daily feature snapshots with Spark: activity, sequence, item/category stats, segments."""
    settings = state(ctx).settings
    run_build(settings, data, parse_day(start, "--start"), parse_day(end, "--end"), format=format, out=out)


def run_build(
    settings: Settings,
    events: Path,
    start: date,
    end: date,
    format: str = "auto",
    out=None,
    brief: bool = False,
):
    """Build with a progress bar, then print the segments and a summary (``brief``: one line)."""
    from shopsight.features.build import build_features

    with progress_bar(transient=True) as bar:  # the tables written, and what the build does now
        task = bar.add_task("building features", total=None)
        result = build_features(
            settings,
            events,
            start,
            end,
            out=out,
            format=format,
            on_step=lambda step: bar.update(task, description=step),
            on_table=lambda done, total, _name: bar.update(task, completed=done, total=total),
        )
    rejected = sum(result.events_rejected.values())
    if brief:
        console.print(
            f"{sum(result.rows.values()):,} rows in {len(result.rows)} tables for {len(result.days)} "
            f"snapshot days, {len(result.segment_profile)} user segments, in {result.out} "
            f"({result.seconds:.1f} s)"
        )
        return result
    table = Table(title="User segments (portrait, last snapshot day)", title_justify="left")
    for column in ("segment", "users", "views 7d", "buys 7d", "active days 7d", "carted, not bought"):
        table.add_column(column, justify="right")
    w = max(settings.features.windows)
    for seg in result.segment_profile:
        table.add_row(
            str(seg["segment_id"]),
            str(seg["size"]),
            f"{seg[f'mean_n_pv_{w}d']:.1f}",
            f"{seg[f'mean_n_buy_{w}d']:.2f}",
            f"{seg[f'mean_active_days_{w}d']:.1f}",
            f"{seg['mean_n_carted_not_bought']:.1f}",
        )
    console.print(table)
    print_summary(
        "Features built",
        {
            "snapshot days": f"{result.days[0]} .. {result.days[-1]} ({len(result.days)})",
            "rows": ", ".join(f"{name} {rows:,}" for name, rows in result.rows.items()),
            "events read": f"{result.events_read:,} ({rejected:,} rejected"
            + (f" -> {result.quarantine})" if result.quarantine else ")"),
            "segments": f"{len(result.segment_profile)}, silhouette {result.silhouette:.3f}",
            "written to": str(result.out),
            "took": f"{result.seconds:.1f} s",
        },
    )
    return result


@app.command("apply")
def apply_command(
    ctx: typer.Context,
    definitions: Annotated[
        Path | None,
        typer.Option(
            help="A team's own definitions (a .py file of Feast objects), applied as the team whose key is "
            "in SHOPSIGHT_API_KEY: they are owned by it, and nothing of another team's may change.",
            show_default="the platform's repository",
        ),
    ] = None,
) -> None:
    """Register the feature repository (entities, views, services) with Feast, or a team's definitions."""
    from shopsight.features import store

    settings = state(ctx).settings
    watch = Stopwatch()
    if definitions is not None:
        from shopsight.features.access import apply_definitions

        names = apply_definitions(settings, definitions)
        print_summary("Definitions applied", {"objects": ", ".join(names), "took": f"{watch.seconds:.1f} s"})
        return
    names = store.apply(settings)
    folder = store.feast_dir(settings)
    print_summary(
        "Feature repository applied",
        {
            "objects": ", ".join(names),
            "Feast repository": f"{folder / store.REPO_FILE} (feast -c {folder} feature-views list)",
            "took": f"{watch.seconds:.1f} s",
        },
    )


@app.command("repo-yaml")
def repo_yaml_command(
    ctx: typer.Context,
    server: Annotated[
        str | None,
        typer.Option(
            help="A feature server's URL (features serve): print a client's file instead, whose online "
            "store is Feast's `remote` store reading through that server.",
            show_default="the platform's own stores",
        ),
    ] = None,
) -> None:
    """Print the profile's feature_store.yaml: the repository as Feast's CLI, UI and clients read it
    (`features apply` also writes it to <data_dir>/feast). No secret is in it: the Redis password is read
    from FEAST_REDIS_PASSWORD, a SQL registry's from PGPASSWORD."""
    from shopsight.features import store

    text = store.repo_yaml(state(ctx).settings, server)  # first: reading the settings may move console.file
    console.file.write(text)


@app.command("materialize")
def materialize_command(
    ctx: typer.Context,
    incremental: Annotated[
        bool,
        typer.Option(
            "--incremental/--no-incremental", help="Only what is new since the last materialisation."
        ),
    ] = False,
    every: Annotated[
        str | None,
        typer.Option(
            help="Run incrementally on a schedule, e.g. 1h, 15m, 30s, until stopped (a long-running job: "
            "`jobs submit materialize --every 1h`).",
            show_default="once",
        ),
    ] = None,
) -> None:
    """Load the offline feature rows into the online store.

    An incremental run on an online store that lost its rows (a Redis restarted without its data) loads
    everything again."""
    from shopsight.features import store

    settings = state(ctx).settings
    if every is not None:
        import signal
        import threading

        seconds = _duration(every)
        stop = threading.Event()

        def finish(signum, frame) -> None:  # a run under way ends whole; a second signal stops at once
            console.print("stopping after the run under way")
            stop.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        signal.signal(signal.SIGINT, finish)
        signal.signal(signal.SIGTERM, finish)  # what Kubernetes and `ray job stop` send
        console.print(
            f"materialising every {every} into the {settings.feast.online_store} store; Ctrl-C stops"
        )
        runs, failed = store.materialize_every(settings, seconds, say=console.print, stop=stop)
        console.print(f"stopped after {runs} runs ({failed} failed)")
        return
    watch = Stopwatch()
    with steps_bar("materialising") as report:
        views = store.materialize(
            settings, incremental=incremental, on_view=report, on_lost=err_console.print
        )
    print_summary(
        "Materialised",
        {
            "views": ", ".join(views),
            "online store": settings.feast.online_store,
            "took": f"{watch.seconds:.1f} s",
        },
    )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    """Seconds of ``30s``, ``15m``, ``1h``, ``1d``; BadParameter otherwise."""
    import re

    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip())
    if not match or float(match.group(1)) <= 0:
        raise typer.BadParameter(
            f"{text!r} is no duration: a number and s, m, h or d, e.g. 1h", param_hint="--every"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


@app.command("embed")
def embed_command(
    ctx: typer.Context,
    model_uri: Annotated[
        str,
        typer.Option(
            help="A registered next-item model: models:/NAME@ALIAS or models:/NAME/VERSION.",
            callback=model_uri_option,
        ),
    ] = "models:/shopsight-next-item@champion",
    day: Annotated[
        list[str] | None,
        typer.Option(help="Only this snapshot day, YYYY-MM-DD (repeatable).", show_default="every day"),
    ] = None,
) -> None:
    """Write each user's sequence embedding from a next-item model into the user_embedding table
    (served by the Feast view user_embedding, in user_profile_v1; `features materialize` loads it)."""
    from shopsight.training.next_item.embeddings import write_user_embeddings

    settings = state(ctx).settings
    days = [parse_day(d, "--day") for d in day] if day else None
    result = write_user_embeddings(settings, model_uri, days)
    print_summary(
        "Embedded",
        {
            "model": result.model_uri,
            "rows": f"{result.rows:,} ({len(result.days)} day(s): {result.days[0]} .. {result.days[-1]})",
            "dimension": str(result.dimension),
            "written to": str(result.out),
            "next": "shopsight features materialize",
            "took": f"{result.seconds:.1f} s",
        },
    )


@app.command("list")
def list_command(ctx: typer.Context, output: OutputOption = "table") -> None:
    """The catalog: feature views and services, owners, online freshness.

    Staleness is how long ago the online rows were last brought up to date (now minus the end of the
    last materialisation; a service's is its stalest view's).

    With -o json or yaml: one record per view or service: name, kind ("feature view" or "feature
    service"), entities, fields (how many), owner, online, fresh_until (the end of the last
    materialisation, ISO 8601, or null), staleness_s (seconds, or null).
    """
    from datetime import UTC, datetime

    from shopsight.features import store

    entries = store.catalog(state(ctx).settings)
    now = datetime.now(UTC)
    records = [
        {
            "name": entry.name,
            "kind": entry.kind,
            "entities": list(entry.entities),
            "fields": len(entry.fields),
            "owner": entry.owner,
            "online": entry.online,
            "fresh_until": entry.fresh_until,
            "staleness_s": round((now - entry.fresh_until).total_seconds()) if entry.fresh_until else None,
        }
        for entry in entries
    ]
    emit(output, records, lambda: catalog_table(records))


def catalog_table(records: list[dict]) -> Table:
    table = Table(title="Feature catalog", title_justify="left")
    for column in ("name", "kind", "entities", "fields", "owner", "online until", "staleness"):
        table.add_column(column, no_wrap=True)
    for record in records:
        fresh = record["fresh_until"].strftime("%Y-%m-%d %H:%M") if record["fresh_until"] else "-"
        stale = _age(record["staleness_s"]) if record["staleness_s"] is not None else "never loaded"
        table.add_row(
            record["name"],
            record["kind"],
            ", ".join(record["entities"]),
            str(record["fields"]),
            record["owner"],
            fresh if record["online"] else "offline only",
            stale if record["online"] else "-",
        )
    return table


def _age(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 20 min``, ``4 d 6 h``: two units at most."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days:,} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min" if minutes else f"{secs} s"


@app.command("describe")
def describe_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A feature view or service.")],
    output: OutputOption = "table",
):
    """One view or service: each field's type, owner and description.

    With -o json or yaml: name, kind, entities, owner, description, online, fresh_until, and fields: a
    record per field (name, type, owner, description).
    """
    from rich.text import Text

    from shopsight.features import store

    entry = store.describe(state(ctx).settings, name)
    data = {
        "name": entry.name,
        "kind": entry.kind,
        "entities": list(entry.entities),
        "owner": entry.owner,
        "description": entry.description,
        "online": entry.online,
        "fresh_until": entry.fresh_until,
        "fields": [
            {"name": f.name, "type": f.dtype, "owner": f.owner, "description": f.description}
            for f in entry.fields
        ],
    }

    def people() -> list:
        heading = Text.assemble(
            (entry.name, "bold"),
            f" ({entry.kind}; entities: {', '.join(entry.entities)}; owner: {entry.owner})\n",
            entry.description,
        )
        table = Table(show_header=True)
        for column in ("field", "type", "owner", "description"):
            table.add_column(column, overflow="fold")
        for field in entry.fields:
            table.add_row(field.name, field.dtype, field.owner, field.description)
        return [heading, table]

    emit(output, data, people)


@app.command("training-set")
def training_set_command(
    ctx: typer.Context,
    service: Annotated[str, typer.Option(help="Feature service, e.g. purchase_propensity_v1.")],
    start: Annotated[str, typer.Option(help="First snapshot day.")],
    end: Annotated[str, typer.Option(help="Last snapshot day (inclusive).")],
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    label: Annotated[
        str | None,
        typer.Option(
            help="Label column; rows whose label is not observed yet are left out.",
            show_default="the label of the task that reads the service, e.g. churn_3d for churn_risk_v1",
        ),
    ] = None,
) -> None:
    """A point-in-time correct training set: labels of each (user, snapshot) with the features as of then."""
    from shopsight.features import store
    from shopsight.training.tasks import TASKS

    readers = [t.data.label for t in TASKS.values() if t.data.source == service and t.data.label]
    label = label or (readers[0] if readers else "buy_next_1d")
    watch = Stopwatch()
    with steps_bar(f"point-in-time join ({label})") as report:
        path, rows = store.training_set(
            state(ctx).settings,
            service,
            parse_day(start, "--start"),
            parse_day(end, "--end"),
            out,
            label=label,
            on_view=report,
        )
    print_summary(
        "Training set",
        {"rows": f"{rows:,}", "label": label, "written to": str(path), "took": f"{watch.seconds:.1f} s"},
    )


@app.command("serve")
def serve_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 6566,
    workers: Annotated[int, typer.Option(min=1, help="Server worker processes.")] = 1,
) -> None:
    """Run the feature server for other teams: Feast's HTTP server (POST /get-online-features), behind
    the teams' API keys and grants; every lookup is logged in <data_dir>/feast/reads."""
    from shopsight.features import store

    settings = state(ctx).settings
    if not settings.serving.api_keys:
        err_console.print(
            "[yellow]no team has an API key (serving.api_keys): every lookup will get 401; "
            "`shopsight serve key TEAM` makes one[/]"
        )
    err_console.print(f"feature server on http://{host}:{port} (POST /get-online-features); Ctrl-C stops it")
    store.serve(settings, host=host, port=port, workers=workers)


@app.command("delete")
def delete_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A feature view or service your team owns.")],
) -> None:
    """Delete a feature view or service; only its owner may (SHOPSIGHT_API_KEY), and not a view that a
    service still uses."""
    from shopsight.features.access import delete

    kind = delete(state(ctx).settings, name)
    console.print(f"{kind} {name} deleted")


TeamArgument = Annotated[str, typer.Argument(help="The team (a name in serving.api_keys).")]
ServiceArgument = Annotated[str, typer.Argument(help="A feature service, e.g. user_profile_v1.")]


@app.command("grant")
def grant_command(ctx: typer.Context, team: TeamArgument, service: ServiceArgument) -> None:
    """Let a team read a feature service, through the feature server. Only the service's owner may:
    SHOPSIGHT_API_KEY holds the owner's key. Grants live in Feast's registry (feast permissions list)."""
    from shopsight.features.access import grant

    result = grant(state(ctx).settings, team, service)
    console.print(f"{team} may read {service} (readers: {', '.join(result.teams)}; owner {result.owner})")


@app.command("revoke")
def revoke_command(ctx: typer.Context, team: TeamArgument, service: ServiceArgument) -> None:
    """Take back a team's reads of a feature service (the owner's key in SHOPSIGHT_API_KEY)."""
    from shopsight.features.access import revoke

    result = revoke(state(ctx).settings, team, service)
    left = ", ".join(result.teams) or "none but the owner"
    console.print(f"{team} may no longer read {service} (readers: {left}; owner {result.owner})")


@app.command("grants")
def grants_command(ctx: typer.Context, output: OutputOption = "table") -> None:
    """Who may read each feature service: its owner, and the teams granted reads.

    With -o json or yaml: one record per service: service, owner, teams.
    """
    from shopsight.features.access import grants
    from shopsight.features.store import feature_store

    rows = grants(feature_store(state(ctx).settings))
    records = [{"service": r.service, "owner": r.owner, "teams": list(r.teams)} for r in rows]

    def table() -> Table:
        shown = Table(title="Feature service grants", title_justify="left")
        for column in ("service", "owner", "teams"):
            shown.add_column(column)
        for r in rows:
            shown.add_row(r.service, r.owner, ", ".join(r.teams) or "-")
        return shown

    emit(output, records, table)


@app.command("push")
def push_command(
    ctx: typer.Context,
    data: Annotated[
        Path | None,
        typer.Option(help="New events (any supported format).", callback=input_path, show_default=False),
    ] = None,
    events: Annotated[
        Path | None,
        typer.Argument(help="The same as --data (the older spelling).", hidden=True, callback=input_path),
    ] = None,
    format: Annotated[FormatName, typer.Option("--format", help=FORMAT_HELP)] = "auto",
) -> None:
    """Fold new events into the online user sequence and activity, without a batch run.

    The events are --data PATH, or the command's argument: `features push new_events.csv`.
    """
    from shopsight.features.push import push_events

    events = one_input(data, events)
    watch = Stopwatch()
    result = push_events(state(ctx).settings, events, format)
    print_summary(
        "Pushed",
        {
            "events": f"{result.events:,} of {result.users:,} users",
            "rejected": f"{sum(result.rejected.values()):,}",
            "took": f"{watch.seconds:.1f} s",
        },
    )


@app.command("get")
def get_command(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="Feature service.")],
    user_ids: Annotated[list[int], typer.Argument(help="User ids.")],
    output: OutputOption = "table",
) -> None:
    """Print a feature service's online values for some users (through the Python SDK).

    With -o json or yaml: one record per user, {"user_id": ..., FEATURE: value, ...}, the values as the
    online store holds them (null where it has none).
    """
    from shopsight.features import store

    values = store.online_features(state(ctx).settings, service, [{"user_id": u} for u in user_ids])
    users = values.get("user_id", [])
    names = sorted(k for k in values if k != "user_id")
    records = [{"user_id": user, **{name: values[name][i] for name in names}} for i, user in enumerate(users)]
    emit(output, records, lambda: online_table(values))


def print_online(values: dict[str, list]) -> None:
    console.print(online_table(values))


def online_table(values: dict[str, list]) -> Table:
    table = Table(title="Online features", title_justify="left")
    table.add_column("feature", style="cyan")
    users = values.get("user_id", [])
    for user in users:
        table.add_column(f"user {user}", overflow="fold")
    for name in sorted(k for k in values if k != "user_id"):
        table.add_row(name, *(_short(v) for v in values[name]))
    return table


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 6:
        return f"[..., {', '.join(map(str, value[-6:]))}] ({len(value)})"
    return "null" if value is None else str(value)
