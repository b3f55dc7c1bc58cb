"""`shopsight config`: inspect the resolved settings."""

from __future__ import annotations

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

    Secrets are masked: settings named as passwords, tokens or keys, and passwords inside URLs, show as
    ***; API-key digests show their first 8 digits.
    """
    resolved = state(ctx).resolved()
    table = Table(title=f"Settings (profile: {resolved.settings.profile})", title_justify="left")
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value")
    table.add_column("source", style="magenta")
    # masked in the settings module, which knows which settings are secrets: this table only prints
    for key, value, source in resolved.shown_items():
        table.add_row(key, value, source)
    console.print(table)
