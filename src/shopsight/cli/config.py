"""`shopsight config`: inspect the resolved settings."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from shopsight.cli._context import state
from shopsight.cli._output import OutputOption, emit
from shopsight.platform import err_console

app = typer.Typer(
    help="Inspect settings: profiles, config files, SHOPSIGHT_* and the ecosystem's variables, --set.",
    no_args_is_help=True,
)


@app.command("show")
def show(ctx: typer.Context, output: OutputOption = "table") -> None:
    """Print every setting's resolved value and where it came from (default, profile, file, env, cli).

    Secrets are masked: settings named as passwords, tokens or keys, and passwords inside URLs, show as
    ***; API-key digests show their first 8 digits. -o yaml (or json) prints the settings as a settings
    file that --config reads back to the same settings; secrets are left out of it (stderr names them),
    API-key digests are whole.
    """
    resolved = state(ctx).resolved()

    def table() -> Table:
        shown = Table(title=f"Settings (profile: {resolved.settings.profile})", title_justify="left")
        shown.add_column("key", style="cyan", no_wrap=True)
        shown.add_column("value")
        shown.add_column("source", style="magenta")
        # masked in the settings module, which knows which settings are secrets: this table only prints;
        # Text: a value such as [a, b] is YAML, not rich markup
        for key, value, source in resolved.shown_items():
            shown.add_row(Text(key), Text(value), Text(source))
        return shown

    values, left_out = resolved.file_values() if output != "table" else ({}, [])
    if left_out:
        err_console.print(
            Text(f"note: secrets left out (they come from where they came from here): {', '.join(left_out)}")
        )
    emit(output, values, table)
