"""`shopsight models`: the MLflow model registry: list, show, promote through the quality gate, history,
rollback (see :mod:`shopsight.lifecycle.promotion` for the gate and :mod:`shopsight.lifecycle.registry` for
what is recorded)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shopsight.cli._context import input_path, state
from shopsight.cli._output import OutputOption, emit, snake, utc, utc_from_ms
from shopsight.platform import (
    PromotionRefused,
    Stopwatch,
    console,
    err_console,
    print_summary,
    summary_table,
)
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
def list_command(ctx: typer.Context, output: OutputOption = "table") -> None:
    """Every registered model with its versions and aliases.

    With -o json or yaml: one record per model: name, versions (numbers, oldest first), aliases
    ({alias: version}), tasks, latest_version_created (ISO 8601 UTC, or null).
    """
    from shopsight.lifecycle.registry import (
        list_registered_models,
        registry_client,
        version_info,
        versions_of,
    )

    client = registry_client(state(ctx).settings)
    records = []
    for model in list_registered_models(client):
        versions = versions_of(client, model.name)
        # the task is a version tag (purchase) or the training run's tag (next item)
        tasks = sorted({version_info(client, model.name, v).task or "" for v in versions} - {""})
        latest = max((v.creation_timestamp for v in versions), default=None)
        records.append(
            {
                "name": model.name,
                "versions": [int(v.version) for v in versions],
                "aliases": {alias: int(v) for alias, v in sorted((model.aliases or {}).items())},
                "tasks": tasks,
                "latest_version_created": utc_from_ms(latest),
            }
        )
    emit(output, records, lambda: _models_table(records))


def _models_table(records: list[dict]):
    if not records:
        return "No registered models yet (`shopsight train` registers one)."
    table = Table(title="Registered models", title_justify="left")
    for column in ("model", "versions", "aliases", "task", "latest version created"):
        table.add_column(column)
    for r in records:
        latest = r["latest_version_created"]
        table.add_row(
            r["name"],
            ", ".join(map(str, r["versions"])) or "-",
            _aliases(r["aliases"]),
            ", ".join(r["tasks"]) or "-",
            datetime.fromisoformat(latest).strftime("%Y-%m-%d %H:%M:%S") if latest else "-",
        )
    return table


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


# the version tags of promotions, rollbacks and gate checks (see shopsight.lifecycle.registry)
_PROMOTION_TAGS = (
    "promoted_at", "promoted_by", "promoted_from", "promotion_action", "promotion_reason", "forced",
    "demoted_at", "demoted_by", "replaced_by", "rolled_back_at", "rolled_back_by", "rollback_reason",
    "gate.status", "gate.reason", "gate.checked_at",
)  # fmt: skip


def _version_record(info) -> dict:
    promotion: dict[str, object] = {snake(tag): info.tags.get(tag) for tag in _PROMOTION_TAGS}
    promotion["forced"] = info.tags.get("forced") == "true"
    return {
        "version": int(info.version),
        "aliases": list(info.aliases),
        "task": info.task,
        "model_type": info.model_type,
        "test_metrics": {snake(key): value for key, value in sorted(info.metrics.items())},
        "dataset": {snake(key.removeprefix("dataset.")): value for key, value in info.dataset.items()},
        "created_by": info.created_by,
        "created_at": info.created_at,
        "run_id": info.run_id,
        "promotion": promotion,
    }


@app.command("show")
def show_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    output: OutputOption = "table",
) -> None:
    """Every version of a model: aliases, task, metrics, data, who registered it and when.

    Per version: aliases, task, model type, the training run's test metrics, the dataset identity, the
    run's user and the version's creation time, its promotions; then the frozen evaluation set and any
    promotion in progress.

    With -o json or yaml: name; versions, a record each (version, aliases, task, model_type,
    test_metrics, dataset, created_by, created_at, run_id, promotion: its promotion and gate tags);
    evaluation_set (path, sha256, frozen_at, frozen_by, or null); lock (the promotion in progress:
    action, owner, since, expires_at, detail, or null).
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
    infos = [version_info(client, name, mv) for mv in versions_of(client, name)]
    tags = model.tags or {}
    holder = lock_holder(client, name)
    data = {
        "name": name,
        "versions": [_version_record(info) for info in infos],
        "evaluation_set": {
            "path": tags.get(EVAL_PATH),
            "sha256": tags[EVAL_SHA256],
            "frozen_at": tags.get("eval.frozen_at"),
            "frozen_by": tags.get("eval.frozen_by"),
        }
        if tags.get(EVAL_SHA256)
        else None,
        "lock": {
            "action": holder.action,
            "owner": holder.owner,
            "since": holder.since,
            "expires_at": utc(holder.expires),
            "detail": holder.detail,
        }
        if holder is not None
        else None,
    }

    def people() -> list:
        table = Table(title=f"{name}", title_justify="left")
        for column in ("version", "aliases", "task", "model", "test metrics (training run)", "dataset",
                       "created by", "created (UTC)", "promotion"):  # fmt: skip
            table.add_column(column, overflow="fold")
        for info in infos:
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
        shown: list = [table]
        if tags.get(EVAL_SHA256):
            shown.append(
                f"frozen evaluation set: {tags.get(EVAL_PATH)} (sha256 {tags[EVAL_SHA256][:12]}, frozen "
                f"{_when(tags.get('eval.frozen_at'))} by {tags.get('eval.frozen_by', '?')})"
            )
        else:
            shown.append("frozen evaluation set: none yet (the first promotion freezes one)")
        if holder is not None:
            shown.append(f"[yellow]a {holder.action} is in progress[/yellow] ({holder.describe()})")
        return shown

    emit(output, data, people)


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
        str | None, typer.Option(help="Version to promote.", show_default="the `challenger` alias")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force/--no-force",
            help="Promote even if the metric is worse (never a model that fails to load, "
            "takes other inputs or predicts NaN); needs --reason.",
        ),
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Why; recorded in the history.")] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            help="The evaluation set to freeze at the first promotion; later only the frozen content (or, "
            "with --force, a new one to re-freeze).",
            show_default="the candidate's training data",
            callback=input_path,
        ),
    ] = None,
    online: Annotated[
        bool,
        typer.Option(
            "--online/--offline",
            help="Judge the challenger on outcomes: its online primary metric against the champion's over "
            "the same window of served answers (as `shopsight monitor` measures it), instead of the frozen "
            "evaluation set.",
        ),
    ] = False,
    day: Annotated[
        str | None, typer.Option(help="--online: the answers made on this shop-local day (YYYY-MM-DD).")
    ] = None,
    start: Annotated[str | None, typer.Option(help="--online: answers as of this time or later.")] = None,
    end: Annotated[str | None, typer.Option(help="--online: answers as of before this time.")] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="--online: the events that followed the answers.",
            show_default="<data_dir>/simulated",
            callback=input_path,
        ),
    ] = None,
    output: OutputOption = "table",
) -> None:
    """Move `champion` to the candidate only if it passes the quality gate.

    Evaluates the candidate and the champion on the frozen evaluation set with the same protocol; the
    candidate must load, take inputs the feature service provides, predict finite values, and not be
    worse on the primary metric than `promotion.tolerance` allows. Prints the difference with its paired
    bootstrap 95% interval; a refusal exits 3 and says why.

    With -o json or yaml: name, task, candidate, champion, metric, tolerance, evaluation_set, checks and
    metrics of the candidate and the champion, difference (mean, lo, hi, units, or null), passed,
    forced, promoted, reasons, history_entry, seconds; printed for a refusal too, before it exits 3.
    """
    from shopsight.lifecycle.promotion import promote

    if force and not (reason or "").strip():
        raise typer.BadParameter("--force needs --reason TEXT (it is recorded)", param_hint="--reason")
    settings = state(ctx).settings
    watch = Stopwatch()
    if online:
        result = _promote_online(settings, name, version, force, reason, day, start, end, data)
    else:
        result = promote(
            settings, name, version, force=force, reason=reason, eval_data=eval_data, log=err_console.print
        )
    seconds = watch.seconds
    data = _promotion_record(result, settings.promotion.bootstrap_samples, seconds)
    emit(output, data, lambda: _promotion_view(result, settings.promotion.bootstrap_samples, seconds))
    if not result.promoted:
        raise PromotionRefused(
            f"promotion of {name} version {result.candidate} refused: " + "; ".join(result.reasons)
        )


def _promote_online(settings, name, version, force, reason, day, start, end, events):
    from shopsight.cli.monitor import window
    from shopsight.lifecycle.promotion import promote_online
    from shopsight.monitoring.monitor import online_evidence

    first, last = window(settings, day, start, end)
    say = err_console.print
    evidence = online_evidence(
        settings, name, events=events or settings.data_dir / "simulated", start=first, end=last, say=say
    )
    if version is not None and version != evidence.candidate:
        raise typer.BadParameter(
            f"--online judges the challenger that answered beside the champion (version "
            f"{evidence.candidate}), not version {version}",
            param_hint="--version",
        )
    return promote_online(settings, name, evidence, force=force, reason=reason, log=say)


def _evaluation_record(evaluation) -> dict | None:
    if evaluation is None:
        return None
    return {
        "checks": {check: {"ok": ok, "why": why} for check, (ok, why) in evaluation.checks.items()},
        "metrics": {snake(key): value for key, value in evaluation.metrics.items()},
        "seconds": evaluation.seconds,
    }


def _promotion_record(result, bootstrap_samples: int, seconds: float) -> dict:
    return {
        "name": result.name,
        "task": result.task,
        "candidate": int(result.candidate),
        "champion": int(result.champion) if result.champion else None,
        "metric": snake(result.metric),
        "tolerance": result.tolerance,
        "evaluation_set": {
            "path": result.eval_path,
            "sha256": result.eval_sha256,
            "frozen_now": result.freeze,
        },
        "candidate_evaluation": _evaluation_record(result.candidate_eval),
        "champion_evaluation": _evaluation_record(result.champion_eval),
        "difference": result.difference,
        "bootstrap_samples": bootstrap_samples,
        "passed": result.passed,
        "forced": result.forced,
        "promoted": result.promoted,
        "reasons": list(result.reasons),
        "history_entry": result.entry,
        "seconds": seconds,
    }


def _promotion_view(result, bootstrap_samples: int, seconds: float) -> list:
    shown: list = [_gate_table(result)]
    if result.difference is not None:
        d = result.difference
        shown.append(
            f"difference (candidate - champion) in {result.metric_label}: {d['mean']:+.4f}, "
            f"95% CI [{d['lo']:+.4f}, {d['hi']:+.4f}] (paired bootstrap, "
            f"{bootstrap_samples} resamples of {int(d['units']):,} "
            f"{get_task(result.task).unit.label}); tolerance {result.tolerance:g}"
        )
    if not result.promoted:
        return shown
    if result.forced:
        shown.append("[yellow]forced:[/yellow] " + "; ".join(result.reasons))
    entry = result.entry or {}
    name = result.name
    shown.append(
        summary_table(
            "Promoted",
            {
                "model": f"{name}: champion -> version {result.candidate}"
                + (f" (was {result.champion})" if result.champion else " (first champion)"),
                "gate": entry.get("gate", "?")
                + (f", forced: {entry.get('reason')}" if result.forced else ""),
                "evaluation set": f"{result.eval_path} (sha256 {result.eval_sha256[:12]}"
                + (", frozen now)" if result.freeze else ")"),
                "history entry": f"#{entry.get('n')} by {entry.get('by')} at {_when(entry.get('at'))}",
                "took": f"{seconds:.1f} s",
            },
        )
    )
    return shown


# the keys of a history entry, in the order -o json prints them (see lifecycle.registry.append_history)
_HISTORY_KEYS = ("n", "at", "by", "action", "from", "to", "gate", "metric", "metrics", "difference",
                 "forced", "reason", "eval")  # fmt: skip


@app.command("history")
def history_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    output: OutputOption = "table",
) -> None:
    """Every promotion and rollback of a model: when, by whom, from which version to which, and why.

    With the primary metric on the frozen evaluation set, the difference's 95% interval, and whether the
    gate was forced.

    With -o json or yaml: the entries, oldest first, as recorded: n, at, by, action (promote or
    rollback), from, to, gate, metric, metrics (by version), difference (mean, lo, hi, units), forced,
    reason, eval; a key the entry does not record is null.
    """
    from shopsight.lifecycle.registry import read_history, registry_client

    client = registry_client(state(ctx).settings)
    history = read_history(client, name)
    records = [
        {
            **{key: e.get(key) for key in _HISTORY_KEYS},
            **{k: v for k, v in e.items() if k not in _HISTORY_KEYS},
        }
        for e in history
    ]
    for record in records:
        record["forced"] = bool(record["forced"])
    emit(output, records, lambda: _history_table(name, history))


def _history_table(name: str, history: list[dict]):
    if not history:
        return f"{name} has no promotion yet (`shopsight models promote {name}`)."
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
    return table


@app.command("rollback")
def rollback_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: Annotated[str | None, typer.Option(help="Why; recorded in the history.")] = None,
) -> None:
    """Move `champion` back to the previous champion (again: further back) and record it."""
    from shopsight.lifecycle.promotion import rollback

    entry = rollback(state(ctx).settings, name, reason, log=err_console.print)
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
