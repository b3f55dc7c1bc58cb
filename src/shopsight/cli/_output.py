"""How a command prints its result: a table for people, or the same data as JSON or YAML for scripts.

A command builds its result once, as plain data: a list of records or a mapping, with snake_case keys and
raw values (numbers unrounded, times as ISO 8601, lists as lists, null for "none"); ``-o json`` and
``-o yaml`` print that data and nothing else on stdout, ``-o table`` (the default) draws the people's view.
Keys are part of the interface: a key is added, never renamed or removed, so that scripts keep working::

    @app.command("list")
    def list_command(ctx: typer.Context, output: OutputOption = "table") -> None:
        records = [{"name": ..., "versions": [...]} for ...]
        emit(output, records, lambda: table_of(records))
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from enum import Enum
from pathlib import PurePath
from typing import Annotated, Any, Literal

import typer

from shopsight.platform import console

OutputFormat = Literal["table", "json", "yaml"]

OutputOption = Annotated[
    OutputFormat,
    typer.Option(
        "--output",
        "-o",
        case_sensitive=False,
        help="table: for people; json or yaml: for scripts, the same data with raw values under stable "
        "snake_case keys, alone on stdout.",
    ),
]


def emit(output: OutputFormat, data: Any, people: Callable[[], Any]) -> None:
    """Print a command's result on stdout: ``data`` as JSON or YAML, or, for ``table``, what ``people()``
    returns (a rich renderable, or a list of them printed one after the other; None if it printed itself).

    ``people`` is only called for ``table``, so what it alone needs (formatting, column widths) costs a
    script nothing."""
    out = console.file  # stdout, or the terminal's copy of it while the engines' output goes to the log
    if output == "json":
        out.write(json.dumps(plain(data), indent=2, ensure_ascii=False) + "\n")
    elif output == "yaml":
        import yaml

        out.write(yaml.safe_dump(plain(data), sort_keys=False, allow_unicode=True, width=1_000_000))
    else:
        shown = people()
        for renderable in shown if isinstance(shown, list | tuple) else [shown]:
            if renderable is not None:
                console.print(renderable)
    out.flush()


def plain(value: Any) -> Any:
    """``value`` as JSON's and YAML's types: dataclasses and mappings as dicts (keys as text), tuples and
    sets as lists, times as ISO 8601, paths as text, enums as their value, numpy scalars and arrays as
    Python numbers and lists; NaN and infinities, which JSON cannot hold, as null."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Enum):
        return plain(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(item) for item in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return plain(value.tolist())
    return str(value)


def snake(name: str) -> str:
    """A key as snake_case: ``hr@10`` -> ``hr_at_10``, ``NDCG@10`` -> ``ndcg_at_10``, ``gate.status`` ->
    ``gate_status``, ``latest version created`` -> ``latest_version_created``."""
    name = name.replace("@", "_at_")
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def utc(seconds: float | None) -> str | None:
    """A unix time as ISO 8601 in UTC to the second, ``2017-11-25T08:30:00Z``, as the registry writes its
    times; None stays None."""
    if not seconds:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_from_ms(ms: float | None) -> str | None:
    """A unix time in milliseconds (MLflow's, Ray's) as :func:`utc` writes it; None stays None."""
    return utc(ms / 1000) if ms else None
