"""The `shopsight` command: one module per command group; it imports the stages, nothing imports it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from shopsight import __version__
from shopsight.cli import cluster, config, data, features, jobs, mlflow, models, serve, train, tune
from shopsight.cli._context import CliState, parse_overrides
from shopsight.cli.demo import demo
from shopsight.platform import ShopsightError, console, err_console

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
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Settings come from, highest first: --set/--data-dir, SHOPSIGHT_* variables, --config (or
    $SHOPSIGHT_CONFIG), ~/.config/shopsight/config.yaml, MLFLOW_TRACKING_URI/RAY_ADDRESS/MASTER, the profile.
    """
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


def main() -> None:
    """Entry point: a user error prints one line on stderr, never a traceback, and exits with its
    ``exit_code`` (1; 3 for a refused promotion); click's usage errors exit 2. A command that fails stops
    the MLflow server it started: no long-lived server is left as the side effect of a failure."""
    from rich.text import Text

    from shopsight.platform.mlflow_server import stop_servers_started_here

    try:
        app()
    except ShopsightError as exc:
        # the message as it is: a path or an interval in brackets is not rich markup
        err_console.print(Text.assemble(("error:", "red"), " ", str(exc)), soft_wrap=True)
        stop_servers_started_here()
        sys.exit(exc.exit_code)
    except SystemExit as exc:
        if exc.code not in (0, None):
            stop_servers_started_here()
        raise
    except BaseException:
        stop_servers_started_here()
        raise
