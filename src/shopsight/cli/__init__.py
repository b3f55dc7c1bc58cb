"""The `shopsight` command: one module per command group; it imports the stages, nothing imports it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from shopsight import __version__
from shopsight.cli import cluster, config, data, features, jobs, mlflow, models, monitor, serve, train, tune
from shopsight.cli._context import CliState, parse_overrides
from shopsight.cli.demo import demo
from shopsight.platform import ShopsightError, console, err_console
from shopsight.platform._logs import log_file, quiet_console, release_console, show_engine_output

app = typer.Typer(
    name="shopsight",
    help="Shopsight: features, training, promotion and serving for e-commerce behaviour prediction.",
    epilog="Results go to stdout (-o json or -o yaml where a command prints a table); errors, warnings "
    "and progress to stderr. Exit status: 0 done, 1 failed, 2 usage error (a bad option or value, a missing "
    "input file), 3 the quality gate refused the promotion. Shell completion: --install-completion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.print(f"shopsight {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    profile: Annotated[
        str | None,
        typer.Option(help="Settings profile: local (embedded), cluster, or one of yours (docs/cluster.md)."),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML settings file, as `config show -o yaml` prints it.",
            show_default="$SHOPSIGHT_CONFIG",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override one setting, KEY=VALUE, the value YAML (repeatable), e.g. spark.master=local[2], "
            "features.windows=[1,7], spark.conf.spark.sql.shuffle.partitions=4.",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Root folder of local files (setting data_dir).")
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Show what Spark, Ray, Feast and MLflow say on the console; otherwise it goes to "
            "<data_dir>/logs/shopsight.log.",
        ),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Settings come from, highest first: --set/--data-dir, SHOPSIGHT_* variables, --config (or
    $SHOPSIGHT_CONFIG), ~/.config/shopsight/config.yaml, MLFLOW_TRACKING_URI/RAY_ADDRESS/MASTER, the profile.
    """
    if verbose:
        show_engine_output()
    overrides = parse_overrides(set_ or [])
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    ctx.obj = CliState(profile=profile, config_file=config_file, overrides=overrides)


app.add_typer(data.app, name="data")
app.add_typer(features.app, name="features")
app.add_typer(config.app, name="config")
app.add_typer(models.app, name="models")
app.add_typer(serve.app, name="serve")
app.add_typer(jobs.app, name="jobs")
app.add_typer(cluster.app, name="cluster")
app.add_typer(mlflow.app, name="mlflow")
app.command("demo")(demo)
app.command("train")(train.train_command)
app.command("evaluate")(train.evaluate_command)
app.command("tune")(tune.tune_command)
app.command("monitor")(monitor.monitor_command)


def main() -> None:
    """Entry point: a user error prints one line on stderr, never a traceback, and exits with its
    ``exit_code`` (1; 3 for a refused promotion); click's usage errors exit 2. A command that fails stops
    the MLflow server it started: no long-lived server is left as the side effect of a failure.

    What the engines print goes to the data directory's log file (:mod:`shopsight.platform._logs`); the
    streams are the terminal's again before click, or Python, reports an error."""
    from rich.text import Text
    from typer import rich_utils

    from shopsight.platform.mlflow_server import stop_servers_started_here

    quiet_console()
    try:
        code = app(standalone_mode=False)
    except ShopsightError as exc:
        release_console()
        # the message as it is: a path or an interval in brackets is not rich markup
        err_console.print(Text.assemble(("error:", "red"), " ", str(exc)), soft_wrap=True)
        stop_servers_started_here()
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # click's usage errors (typer carries its own click)
        release_console()
        rich_utils.rich_format_error(exc)  # type: ignore[arg-type]
        stop_servers_started_here()
        sys.exit(getattr(exc, "exit_code", 1))
    except typer.Abort:
        release_console()
        err_console.print("Aborted.")
        stop_servers_started_here()
        sys.exit(1)
    except BaseException as exc:
        release_console()
        stop_servers_started_here()
        if not isinstance(exc, SystemExit | KeyboardInterrupt) and log_file() is not None:
            err_console.print(f"(what the engines said before this is in {log_file()})", markup=False)
        raise
    code = code if isinstance(code, int) else 0
    if code:
        stop_servers_started_here()
    sys.exit(code)
