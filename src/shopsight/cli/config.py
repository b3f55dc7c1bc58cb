"""`shopsight config`: inspect the resolved settings."""

from __future__ import annotations

import re

import typer
from rich.table import Table

from shopsight.cli._context import state
from shopsight.platform import console

app = typer.Typer(
    help="Inspect settings: profiles, config files, SHOPSIGHT_* variables, --set overrides.",
    no_args_is_help=True,
)


@app.command("show")
def show(ctx: typer.Context) -> None:
    """Print every setting's resolved value and where it came from (default, profile, file, env, cli).

    Passwords inside URLs are masked.
    """
    resolved = state(ctx).resolved()
    table = Table(title=f"Settings (profile: {resolved.settings.profile})", title_justify="left")
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value")
    table.add_column("source", style="magenta")
    for key, value, source in resolved.items():
        table.add_row(key, _mask(value), source)
    console.print(table)


def _mask(value: object) -> str:
    text = "null" if value is None else str(value)
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", text)
