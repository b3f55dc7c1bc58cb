"""The chaos suite: each case injects one fault while work is in flight, then counts what was lost.

Every case records its counts (case, work in flight, lost, recovered, time to recover) with ``record``
(tests/conftest.py: the served API's cases live beside its world in tests/component/test_serving.py, marked
``chaos``); they are appended to ``benchmarks/results/chaos.md`` by ``python -m benchmarks.chaos_report``.
"""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(scope="session")
def free_port():
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
