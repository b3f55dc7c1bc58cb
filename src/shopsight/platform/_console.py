"""Progress bars and end-of-command summaries, so that long work shows where it is and what it made.

Two consoles, so that a command's output can be piped or parsed: ``console`` (stdout) carries the result
(tables, summaries, ``-o json``); ``err_console`` (stderr) carries everything said along the way: errors,
warnings and notes, spinners, progress bars and progress lines.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@contextmanager
def progress_bar(transient: bool = False) -> Iterator[Progress]:
    """A rich progress bar on stderr; add tasks with ``bar.add_task(description, total=n)``."""
    with Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    ) as bar:
        yield bar


class Stopwatch:
    """Wall time since creation, for summaries."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start


def summary_table(title: str, rows: dict[str, object]) -> Table:
    """A two-column summary table: what the command produced, where, how long."""
    table = Table(title=title, show_header=False, title_justify="left", title_style="bold")
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


def print_summary(title: str, rows: dict[str, object]) -> None:
    """Print :func:`summary_table` on stdout."""
    console.print(summary_table(title, rows))
