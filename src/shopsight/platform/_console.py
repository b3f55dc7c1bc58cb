"""Progress bars and end-of-command summaries, so that long work shows where it is and what it made.

Two consoles, so that a command's output can be piped or parsed: ``console`` (stdout) carries the result
(tables, summaries, ``-o json``); ``err_console`` (stderr) carries everything said along the way: errors,
warnings and notes, spinners, progress bars and progress lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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
        # what the engines print while the bar runs belongs to the log file, not above the bar
        redirect_stdout=False,
        redirect_stderr=False,
        disable=not err_console.is_terminal,  # a pipe or a log file gets the lines, not a bar's last frame
    ) as bar:
        yield bar


@contextmanager
def steps_bar(label: str) -> Iterator[Callable[[int, int, str], None]]:
    """A transient bar for work done in named steps: yields ``report(done, total, name)``, which a stage
    calls as each step (a table, a view) starts, and once more at the end."""
    with progress_bar(transient=True) as bar:
        task = bar.add_task(label, total=None)

        def report(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{label}: {name}" if name else label)

        yield report


class Spinner:
    """What :func:`spinner` yields: ``update(text)`` says what the work is doing now."""

    def __init__(self, progress: Progress, task) -> None:
        self._progress, self._task = progress, task

    def update(self, text: str) -> None:
        self._progress.update(self._task, description=text)


@contextmanager
def spinner(text: str) -> Iterator[Spinner]:
    """A spinner with the time elapsed on stderr, gone when the work ends (rich's ``Console.status``
    would also put what the engines print above it: that belongs to the log file)."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
        disable=not err_console.is_terminal,
    ) as progress:
        yield Spinner(progress, progress.add_task(text, total=None))


def note(text: str) -> None:
    """A line said along the way (progress, where a run is): stderr, printed as it is (no markup)."""
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


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
