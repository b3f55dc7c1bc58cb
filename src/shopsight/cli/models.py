"""`shopsight models`: the MLflow model registry: list, show, promote through the quality gate, history,
rollback (see :mod:`shopsight.lifecycle.promotion` for the gate and :mod:`shopsight.lifecycle.registry` for
what is recorded)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shopsight.cli._context import state
from shopsight.platform import ShopsightError, Stopwatch, console, print_summary
from shopsight.training.tasks import TASKS, get_task

app = typer.Typer(
    help="The MLflow model registry: list, show, promote through the quality gate, history, rollback.",
    no_args_is_help=True,
)


def _when(iso: str | None) -> str:
    return (iso or "").replace("T", " ").replace("Z", "")


def _metrics_text(task: str | None, metrics: dict[str, float]) -> str:
    known = TASKS.get((task or "").replace("-", "_"))
    keys = [(m.key.replace("@", "_at_"), m.label) for m in known.reported] if known else []
    shown = [f"{label} {metrics[key]:.4f}" for key, label in keys if key in metrics]
    if not shown:  # an unknown task: the first few test metrics as they are
        shown = [f"{k} {v:.4f}" for k, v in sorted(metrics.items())[:3]]
    return ", ".join(shown) or "-"


def _aliases(aliases: dict) -> str:
    return ", ".join(f"{alias} -> {version}" for alias, version in sorted(aliases.items())) or "-"


@app.command("list")
def list_command(ctx: typer.Context) -> None:
    """Every registered model with its versions and aliases."""
    from shopsight.lifecycle.registry import (
        list_registered_models,
        registry_client,
        version_info,
        versions_of,
    )

    client = registry_client(state(ctx).settings)
    models = list_registered_models(client)
    if not models:
        console.print("No registered models yet (`shopsight train` registers one).")
        return
    table = Table(title="Registered models", title_justify="left")
    for column in ("model", "versions", "aliases", "task", "latest version created"):
        table.add_column(column)
    for model in models:
        versions = versions_of(client, model.name)
        # the task is a version tag (purchase) or the training run's tag (next item)
        tasks = sorted({version_info(client, model.name, v).task or "" for v in versions} - {""})
        latest = max((v.creation_timestamp for v in versions), default=None)
        table.add_row(
            model.name,
            ", ".join(v.version for v in versions) or "-",
            _aliases(model.aliases or {}),
            ", ".join(tasks) or "-",
            datetime.fromtimestamp(latest / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S") if latest else "-",
        )
    console.print(table)


def _promotion_text(tags: dict[str, str]) -> str:
    parts = []
    if tags.get("promoted_at"):
        how = "rolled back to" if tags.get("promotion_action") == "rollback" else "promoted"
        forced = " (forced)" if tags.get("forced") == "true" else ""
        parts.append(
            f"{how} {_when(tags['promoted_at'])} by {tags.get('promoted_by', '?')}{forced}: "
            f"{tags.get('promotion_reason', '')}"
        )
    # only what happened after it last became champion (ISO times compare as text)
    since = tags.get("promoted_at", "")
    rolled_back, demoted = tags.get("rolled_back_at", ""), tags.get("demoted_at", "")
    if rolled_back > since and rolled_back >= demoted:
        parts.append(f"rolled back {_when(rolled_back)} by {tags.get('rolled_back_by', '?')}")
    elif demoted > since:
        parts.append(f"replaced by version {tags.get('replaced_by')} {_when(demoted)}")
    if tags.get("gate.status") == "refused":
        parts.append(f"refused {_when(tags.get('gate.checked_at'))}: {tags.get('gate.reason', '')}")
    return "; ".join(parts) or "-"


@app.command("show")
def show_command(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Registered model name.")]
) -> None:
    """Every version of a model: aliases, task, metrics, data, who registered it and when.

    Per version: aliases, task, model type, the training run's test metrics, the dataset identity, the
    run's user and the version's creation time, its promotions; then the frozen evaluation set and any
    promotion in progress.
    """
    from shopsight.lifecycle.registry import (
        EVAL_PATH,
        EVAL_SHA256,
        lock_holder,
        registered_model,
        registry_client,
        version_info,
        versions_of,
    )

    client = registry_client(state(ctx).settings)
    model = registered_model(client, name)
    table = Table(title=f"{name}", title_justify="left")
    for column in ("version", "aliases", "task", "model", "test metrics (training run)", "dataset",
                   "created by", "created (UTC)", "promotion"):  # fmt: skip
        table.add_column(column, overflow="fold")
    for mv in versions_of(client, name):
        info = version_info(client, name, mv)
        dataset = info.dataset.get("dataset.path", "-")
        if info.dataset.get("dataset.sha256"):
            dataset = f"{dataset} (sha256 {info.dataset['dataset.sha256'][:12]})"
        table.add_row(
            info.version,
            ", ".join(info.aliases) or "-",
            info.task or "-",
            info.model_type or "-",
            _metrics_text(info.task, info.metrics),
            dataset,
            info.created_by or "-",
            _when(info.created_at),
            _promotion_text(info.tags),
        )
    console.print(table)
    tags = model.tags or {}
    if tags.get(EVAL_SHA256):
        console.print(
            f"frozen evaluation set: {tags.get(EVAL_PATH)} (sha256 {tags[EVAL_SHA256][:12]}, frozen "
            f"{_when(tags.get('eval.frozen_at'))} by {tags.get('eval.frozen_by', '?')})"
        )
    else:
        console.print("frozen evaluation set: none yet (the first promotion freezes one)")
    holder = lock_holder(client, name)
    if holder is not None:
        console.print(f"[yellow]a {holder.action} is in progress[/yellow] ({holder.describe()})")


def _check_text(evaluation, check: str) -> str:
    if evaluation is None or check not in evaluation.checks:
        return "-"
    ok, why = evaluation.checks[check]
    return f"{'[green]ok[/green]' if ok else '[red]FAIL[/red]'} {why}"


def _gate_table(result) -> Table:
    title = f"Promotion gate: {result.name} version {result.candidate}"
    title += f" vs champion version {result.champion}" if result.champion else " (no champion yet)"
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column(f"candidate v{result.candidate}", overflow="fold")
    if result.champion:
        table.add_column(f"champion v{result.champion}", overflow="fold")
    evaluations = [result.candidate_eval] + ([result.champion_eval] if result.champion else [])
    for check in ("loads", "inputs", "finite"):
        table.add_row(check, *(_check_text(e, check) for e in evaluations))
    task = get_task(result.task)
    keys = [(m.key, m.label) for m in (*task.reported, task.unit)]
    for key, label in keys:
        cells = []
        for e in evaluations:
            value = None if e is None else e.metrics.get(key)
            cells.append(
                "-" if value is None else (f"{int(value):,}" if key in ("users", "n") else f"{value:.4f}")
            )
        table.add_row(label + (" (primary)" if key == result.metric else ""), *cells)
    return table


@app.command("promote")
def promote_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Registered model name, e.g. shopsight-next-item.")],
    version: Annotated[
        str | None, typer.Option(help="Version to promote (default: the `challenger` alias).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Promote even if the metric is worse (never a model that fails to load, "
            "takes other inputs or predicts NaN); needs --reason.",
        ),
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Why; recorded in the history.")] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            help="The evaluation set to freeze at the first promotion (default: the candidate's training "
            "data); later only the frozen content (or, with --force, a new one to re-freeze)."
        ),
    ] = None,
) -> None:
    """Move `champion` to the candidate only if it passes the quality gate.

    Evaluates the candidate and the champion on the frozen evaluation set with the same protocol; the
    candidate must load, take inputs the feature service provides, predict finite values, and not be
    worse on the primary metric than `promotion.tolerance` allows. Prints the difference with its paired
    bootstrap 95% interval; a refusal exits 1 and says why.
    """
    from shopsight.lifecycle.promotion import promote

    if force and not (reason or "").strip():
        raise typer.BadParameter("--force needs --reason TEXT (it is recorded)", param_hint="--reason")
    settings = state(ctx).settings
    watch = Stopwatch()
    result = promote(
        settings, name, version, force=force, reason=reason, eval_data=eval_data, log=console.print
    )
    console.print(_gate_table(result))
    if result.difference is not None:
        d = result.difference
        console.print(
            f"difference (candidate - champion) in {result.metric_label}: {d['mean']:+.4f}, "
            f"95% CI [{d['lo']:+.4f}, {d['hi']:+.4f}] (paired bootstrap, "
            f"{settings.promotion.bootstrap_samples} resamples of {int(d['units']):,} "
            f"{get_task(result.task).unit.label}); tolerance {result.tolerance:g}"
        )
    if not result.promoted:
        raise ShopsightError(
            f"promotion of {name} version {result.candidate} refused: " + "; ".join(result.reasons)
        )
    if result.forced:
        console.print("[yellow]forced:[/yellow] " + "; ".join(result.reasons))
    entry = result.entry or {}
    print_summary(
        "Promoted",
        {
            "model": f"{name}: champion -> version {result.candidate}"
            + (f" (was {result.champion})" if result.champion else " (first champion)"),
            "gate": entry.get("gate", "?") + (f", forced: {entry.get('reason')}" if result.forced else ""),
            "evaluation set": f"{result.eval_path} (sha256 {result.eval_sha256[:12]}"
            + (", frozen now)" if result.freeze else ")"),
            "history entry": f"#{entry.get('n')} by {entry.get('by')} at {_when(entry.get('at'))}",
            "took": f"{watch.seconds:.1f} s",
        },
    )


@app.command("history")
def history_command(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Registered model name.")]
) -> None:
    """Every promotion and rollback of a model: when, by whom, from which version to which, and why.

    With the primary metric on the frozen evaluation set, the difference's 95% interval, and whether the
    gate was forced.
    """
    from shopsight.lifecycle.registry import read_history, registry_client

    client = registry_client(state(ctx).settings)
    history = read_history(client, name)
    if not history:
        console.print(f"{name} has no promotion yet (`shopsight models promote {name}`).")
        return
    table = Table(title=f"Promotion history of {name}", title_justify="left")
    for column in ("#", "when (UTC)", "by", "action", "from -> to", "metric", "difference [95% CI]",
                   "forced", "reason"):  # fmt: skip
        table.add_column(column, overflow="fold")
    for e in history:
        metrics = e.get("metrics") or {}
        shown = ", ".join(f"v{v} {x:.4f}" for v, x in metrics.items() if x is not None)
        d = e.get("difference")
        diff = f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" if d else "-"
        table.add_row(
            str(e.get("n")),
            _when(e.get("at")),
            str(e.get("by", "?")),
            str(e.get("action")),
            f"{e.get('from') or '-'} -> {e.get('to')}",
            f"{e.get('metric')}: {shown}" if e.get("metric") and shown else "-",
            diff,
            "yes" if e.get("forced") else "no",
            str(e.get("reason") or ""),
        )
    console.print(table)


@app.command("rollback")
def rollback_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: Annotated[str | None, typer.Option(help="Why; recorded in the history.")] = None,
) -> None:
    """Move `champion` back to the previous champion (again: further back) and record it."""
    from shopsight.lifecycle.promotion import rollback

    entry = rollback(state(ctx).settings, name, reason, log=console.print)
    print_summary(
        "Rolled back",
        {
            "model": f"{name}: champion -> version {entry['to']} (was {entry['from']})",
            "history entry": f"#{entry['n']} by {entry['by']} at {_when(entry['at'])}",
            "reason": entry["reason"],
        },
    )


@app.command("unlock")
def unlock_command(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Registered model name.")]
) -> None:
    """Clear the promotion lock of a model whose promotion died.

    The lock also expires by itself after `promotion.lock_ttl_s`.
    """
    from shopsight.lifecycle.registry import break_lock, registry_client

    holder = break_lock(registry_client(state(ctx).settings), name)
    if holder is None:
        console.print(f"{name} was not locked.")
    else:
        console.print(f"cleared the lock of a {holder.action} of {name} ({holder.describe()})")
