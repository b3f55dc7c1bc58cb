"""What the workers of a training run say, shown by the process that started it.

Epoch lines, where each rank runs and from which epoch it resumes, the tracking server going away and
coming back, whatever a task's worker prints: the workers put these lines on a Ray queue, and a thread
of the driver prints them on stderr under a per-epoch progress bar with its ETA. They reach whoever
started the run, a terminal or a Ray job's log, whether Ray forwards the workers' own output or not. It
does not, unless ``-v``: what else a worker says is the engines' (Ray Train's controller, the process
group, library warnings on stderr), which Ray keeps in its logs.
"""

from __future__ import annotations

import functools
import io
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

from shopsight.platform import progress_bar


@contextmanager
def shown_here(epochs: int, label: str) -> Iterator[Any]:
    """A queue for the workers' lines (pass it to them), printed here while the block runs. The queue's
    actor takes no CPU, and lives on this node, so that losing another node does not lose it."""
    import ray
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    stop = threading.Event()
    with progress_bar() as bar:
        task = bar.add_task(label, total=epochs)

        def show() -> None:
            while True:
                try:
                    epoch, line = queue.get(timeout=0.5)
                except Empty:
                    if stop.is_set():
                        return
                    continue
                except Exception:  # noqa: BLE001 - the queue's actor is gone: the workers print instead
                    return
                if line is not None:
                    bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
                if epoch is not None:
                    bar.update(task, completed=epoch)

        thread = threading.Thread(target=show, name="training-feed", daemon=True)
        thread.start()
        try:
            yield queue
        finally:
            stop.set()
            thread.join(timeout=30)
            queue.shutdown()
            done = bar.tasks[0].completed
            if done:  # stopped early: the bar ends where training did
                bar.update(task, total=done)


def printed_here(worker: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """``worker`` with what it prints sent to the driver, line by line, when its config holds a queue: a
    task's own lines (its epochs, "distilling from 2 teachers") need no other channel than ``print``."""

    @functools.wraps(worker)
    def run(config: dict[str, Any]) -> None:
        queue = config.get("feed")
        if queue is None:
            return worker(config)
        lines = _Lines(queue)
        try:
            with redirect_stdout(lines):
                return worker(config)
        finally:
            lines.close()

    return run


class _Lines(io.TextIOBase):
    """A text stream that says each complete line on the queue."""

    def __init__(self, queue: Any) -> None:
        super().__init__()
        self.queue, self.pending = queue, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            say(self.queue, line)
        return len(text)

    def close(self) -> None:
        if self.pending:
            say(self.queue, self.pending)
            self.pending = ""
        super().close()


def say(queue: Any, line: str | None, epoch: int | None = None) -> None:
    """A worker's line for the driver, or ``epoch`` alone: the epochs done, which moves the bar. Without
    a queue, or where its actor cannot be reached, the line is printed: Ray keeps it in the worker's log."""
    if queue is not None:
        try:
            queue.put((epoch, line), timeout=5)
            return
        except Exception:  # noqa: BLE001 - whatever became of the queue, the line is not lost
            pass
    if line is not None:  # the process's own stdout: print() may be the queue's writer itself
        print(line, file=sys.__stdout__, flush=True)
