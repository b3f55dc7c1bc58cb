"""`shopsight jobs submit | list | status | logs | stop`: Shopsight work as Ray jobs on the profile's cluster.

``jobs submit KIND [OPTIONS]`` takes the options of the command it runs (``jobs submit train --data X
--workers 2`` runs ``shopsight train --data X --workers 2`` on the cluster). They are checked here, before
anything is sent: an unknown kind or option, a missing input file or an unreachable cluster fails at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shopsight.cli._context import CliState, state
from shopsight.cli._output import OutputOption, emit, utc_from_ms
from shopsight.platform import (
    Settings,
    UsageError,
    console,
    err_console,
    print_summary,
    summary_table,
)
from shopsight.platform.jobs import KINDS, TERMINAL, job_info, log_tail, submit, wait
from shopsight.platform.ray_cluster import JobsEndpoint, jobs_endpoint

app = typer.Typer(
    help="Submit feature builds, materialisation, training, sweeps, evaluations and promotions to the Ray "
    "cluster of the profile (local: `shopsight cluster up`), and follow them.",
    no_args_is_help=True,
)
# options naming inputs that must exist when the job starts
_INPUTS = ("events", "data", "eval_data")


def _command(kind: str):
    from shopsight.cli import app as root

    command = typer.main.get_command(root)
    for name in KINDS[kind]:
        command = command.get_command(typer.Context(command), name)  # type: ignore[attr-defined]
    return command


def check_arguments(kind: str, args: list[str], local_cluster: bool) -> list[str]:
    """Parse ``args`` as the options of the kind's command (without running it); return them with every
    path made absolute (the job does not run in this folder).

    Raises:
        UsageError: an unknown kind, a bad option, a missing input, a relative path for a remote cluster
            (exit 2, as the command itself would say of them).
    """
    if kind not in KINDS:
        raise UsageError(f"unknown job kind {kind!r}: one of {', '.join(KINDS)}")
    command = _command(kind)
    name = "shopsight " + " ".join(KINDS[kind])
    try:
        # the inputs are checked below: on a remote cluster they need not exist here
        ctx = command.make_context(name, list(args), obj=CliState(inputs_elsewhere=True))
    except Exception as exc:  # noqa: BLE001 - typer's (vendored) click usage errors
        raise UsageError(f"{name}: {getattr(exc, 'format_message', exc.__str__)()}") from None
    if kind == "promote" and ctx.params.get("force") and not (ctx.params.get("reason") or "").strip():
        # checked by the command itself only when it runs: on the cluster, after the job was queued
        raise UsageError(f"{name}: --force needs --reason TEXT (it is recorded)")
    out = list(args)
    for param in command.params:
        value = ctx.params.get(param.name)
        if not isinstance(value, Path):  # typer hands Path-annotated options over as Path objects
            continue
        path = Path(value)
        if not local_cluster and not path.is_absolute():
            raise UsageError(
                f"--{param.name.replace('_', '-')} {value}: a relative path means nothing on a remote "
                "cluster; give a path on storage the cluster mounts"
            )
        if param.name in _INPUTS and not path.exists():
            if local_cluster:
                raise UsageError(f"--{param.name.replace('_', '-')} {value}: no such file or folder")
            err_console.print(f"note: {value} is not visible here; the cluster must have it")
        # an option given by its former name (`features build --events`) is found by that name too
        former = [old for old, new in getattr(command, "former_names", {}).items() if new in param.opts]
        out = _replace_value(out, [*param.opts, *former], str(path.absolute()))
    return out


def _replace_value(args: list[str], opts: list[str], value: str) -> list[str]:
    out = []
    skip = False
    for i, token in enumerate(args):
        if skip:
            skip = False
            continue
        if token in opts and i + 1 < len(args):
            out += [token, value]
            skip = True
        elif any(token.startswith(opt + "=") for opt in opts):
            out.append(token.split("=", 1)[0] + "=" + value)
        else:
            out.append(token)
    return out


def _endpoint(settings: Settings) -> tuple[JobsEndpoint, bool]:
    return jobs_endpoint(settings), not settings.ray.address


@app.command(
    "submit",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def submit_command(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help=f"What to run: {' | '.join(KINDS)}.", show_default=False)],
    follow: Annotated[
        bool,
        typer.Option("--follow/--no-follow", "-f", help="Stream the job's log and exit with its outcome."),
    ] = False,
    entrypoint_cpus: Annotated[
        float, typer.Option("--entrypoint-cpus", min=0, help="CPUs reserved for the job's driver.")
    ] = 0,
) -> None:
    """Submit `shopsight KIND-COMMAND OPTIONS...` as a Ray job; prints its id and how to follow it.

    The options after KIND are those of the command it runs: `jobs submit train --help` lists them."""
    if kind in ("--help", "-h") or "--help" in ctx.args or "-h" in ctx.args:
        console.print(ctx.get_help())
        if kind in KINDS:
            runs = " ".join(KINDS[kind])
            console.print(f"\n[bold]{kind}[/bold] runs `shopsight {runs}`, whose options are:")
            command = _command(kind)
            console.print(command.get_help(typer.Context(command, info_name=" ".join(KINDS[kind]))))
        raise typer.Exit(0)
    settings = state(ctx).settings
    local_cluster = not settings.ray.address
    args = check_arguments(kind, list(ctx.args), local_cluster)  # before contacting the cluster
    endpoint = jobs_endpoint(settings)
    submission = submit(
        endpoint, kind, args, settings, local_cluster=local_cluster, entrypoint_num_cpus=entrypoint_cpus
    )
    print_summary(
        "job submitted",
        {
            "job id": submission.job_id,
            "cluster": endpoint.address,
            "runs": submission.entrypoint,
            "follow": f"shopsight jobs logs {submission.job_id} --follow",
            "status": f"shopsight jobs status {submission.job_id}",
        },
    )
    if follow:
        _follow(endpoint, submission.job_id)
        _exit_with_status(endpoint, submission.job_id, wait(endpoint, submission.job_id))


@app.command("list")
def list_command(ctx: typer.Context, output: OutputOption = "table") -> None:
    """Jobs on the cluster, newest first.

    With -o json or yaml: a record per job: job_id, kind, status, started_at and ended_at (ISO 8601 UTC,
    or null), seconds (null while it runs), entrypoint.
    """
    endpoint, _ = _endpoint(state(ctx).settings)
    jobs = sorted(endpoint.client().list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    records = [
        {
            "job_id": job.submission_id or job.job_id,
            "kind": (job.metadata or {}).get("shopsight_kind"),
            "status": str(job.status),
            "started_at": utc_from_ms(job.start_time),
            "ended_at": utc_from_ms(job.end_time),
            "seconds": (job.end_time - job.start_time) / 1000 if job.end_time and job.start_time else None,
            "entrypoint": job.entrypoint,
        }
        for job in jobs
    ]

    def table():
        if not jobs:
            return f"no jobs on {endpoint.address}"
        shown = Table("job id", "kind", "status", "started", "took", "entrypoint")
        for job, record in zip(jobs, records, strict=True):
            took = f"{record['seconds']:.0f} s" if record["seconds"] is not None else "-"
            shown.add_row(
                record["job_id"] or "-",
                record["kind"] or "-",
                record["status"],
                _clock(job.start_time),
                took,
                job.entrypoint,
            )
        return shown

    emit(output, records, table)


@app.command("status")
def status_command(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The id `jobs submit` printed.")],
    wait_: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the job ends.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(help="With --wait: give up after this many seconds.", show_default="never"),
    ] = None,
    output: OutputOption = "table",
) -> None:
    """A job's status; a failed or stopped job prints its log's tail (on stderr) and exits 1.

    With -o json or yaml: job_id, status, started_at and ended_at (ISO 8601 UTC, or null), message (the
    last line of Ray's, or null).
    """
    endpoint, _ = _endpoint(state(ctx).settings)
    info = wait(endpoint, job_id, timeout) if wait_ else job_info(endpoint, job_id)
    _exit_with_status(endpoint, job_id, info, output)


def _exit_with_status(endpoint: JobsEndpoint, job_id: str, info, output: str = "table") -> None:
    status = str(info.status)
    message = info.message.strip().splitlines()[-1][:300] if (info.message or "").strip() else None
    data = {
        "job_id": job_id,
        "status": status,
        "started_at": utc_from_ms(info.start_time),
        "ended_at": utc_from_ms(info.end_time),
        "message": message,
    }
    rows = {"status": status, "started": _clock(info.start_time), "ended": _clock(info.end_time)}
    if message:
        rows["message"] = message
    emit(output, data, lambda: summary_table(f"job {job_id}", rows))
    if status in ("FAILED", "STOPPED"):
        tail = log_tail(endpoint, job_id)
        if tail:
            err_console.print("[bold]last lines of its log:[/bold]")
            err_console.print(tail, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command("logs")
def logs_command(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The id `jobs submit` printed.")],
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", "-f", help="Keep printing until the job ends.")
    ] = False,
) -> None:
    """A job's log (driver output: epoch lines, summaries)."""
    endpoint, _ = _endpoint(state(ctx).settings)
    job_info(endpoint, job_id)  # an unknown id is a clear error, not an empty log
    if follow:
        _follow(endpoint, job_id)
    else:
        console.file.write(endpoint.client().get_job_logs(job_id))


def _follow(endpoint: JobsEndpoint, job_id: str) -> None:
    async def stream() -> None:
        async for chunk in endpoint.client().tail_job_logs(job_id):
            console.file.write(chunk)
            console.file.flush()

    asyncio.run(stream())


@app.command("stop")
def stop_command(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="The id `jobs submit` printed.")]
) -> None:
    """Stop a running job."""
    endpoint, _ = _endpoint(state(ctx).settings)
    if str(job_info(endpoint, job_id).status) in TERMINAL:
        console.print(f"job {job_id} had already ended")
        return
    endpoint.client().stop_job(job_id)
    console.print(f"job {job_id}: stop requested ({str(wait(endpoint, job_id, timeout_s=60).status)})")


def _clock(ms: int | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"
