"""The chaos suite: each case injects one fault while work is in flight, then counts what was lost.

Every case records its counts (case, work in flight, lost, recovered, time to recover) with ``record``;
they are appended to ``benchmarks/results/chaos.md`` by ``python -m benchmarks.chaos_report`` from the
JSON lines the run leaves in ``$CHAOS_COUNTS_FILE`` (default: none kept; not a ``SHOPSIGHT_*`` name, which
the settings would read as one of theirs).
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest


@pytest.fixture(scope="session")
def free_port():
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture
def record(request):
    """``record(in_flight=..., lost=..., recovered=..., seconds_to_recover=...)`` for this case."""

    def write(**counts) -> None:
        path = os.environ.get("CHAOS_COUNTS_FILE")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"case": request.node.name, "at": time.time(), **counts}) + "\n")

    return write
