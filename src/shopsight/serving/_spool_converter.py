"""The prediction log's converter process: ``python -m shopsight.serving._spool_converter``.

A replica's prediction log hands the conversion of its closed spool segments to parquet to this process,
at a lower CPU priority than serving. In the replica, decoding MessagePack and building Arrow tables is
Python work that holds the interpreter lock while requests wait; here it competes with them only for
what CPU is left over.

Protocol: each job on stdin is a pickled ``(spool_dir, destination, filesystem)``; each answer on stdout is
one JSON line, ``{"converted": N}`` or ``{"error": "..."}``. The process ends when stdin closes, which is
also what happens when its replica dies.
"""

from __future__ import annotations

import json
import os
import pickle
import sys

NICENESS = 10


def main() -> None:
    os.nice(NICENESS)
    from shopsight.serving.prediction_log import collect

    jobs, answers = sys.stdin.buffer, sys.stdout
    while True:
        try:
            spool_dir, destination, filesystem = pickle.load(jobs)
        except EOFError:
            return
        try:
            answer = {"converted": collect(spool_dir, destination, filesystem)}
        except Exception as exc:  # noqa: BLE001 - reported to the replica, which logs it and retries
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
