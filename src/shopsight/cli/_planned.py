"""Command groups whose commands arrive with later stages; their help already says what they will do."""

from __future__ import annotations

import typer

_PLANNED = {
    "jobs": "Submit feature builds, training runs and sweeps to a Ray cluster and follow them.",
}


def planned_groups() -> dict[str, typer.Typer]:
    groups = {}
    for name, purpose in _PLANNED.items():
        group = typer.Typer(help=f"{purpose} (Not available in this version yet.)", no_args_is_help=True)

        @group.callback()
        def _callback() -> None:
            pass

        groups[name] = group
    return groups
