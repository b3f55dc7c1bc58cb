"""Run the chaos suite and append its counts to benchmarks/results/chaos.md.

Each case injects one fault while work is in flight and records what it counted (work in flight, lost,
recovered, time to recover) through the ``record`` fixture. The suite is every test marked ``chaos``: those
of tests/chaos and the served API's, which use the serving tests' world (Redis killed under load, a model
replica killed under load) and so live in tests/component/test_serving.py (its other tests do not run, its
world is still built: a few minutes).

    python -m benchmarks.chaos_report
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._machine import append_report, describe_machine

RESULTS = Path(__file__).parent / "results"
SUITE = (
    "tests/chaos",
    "tests/component/test_serving.py",
    "tests/component/test_ray_train.py",
    "tests/component/test_cluster_jobs.py",
)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "chaos.jsonl"
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "chaos", *SUITE, "-q", "-p", "no:cacheprovider"],
            env={**os.environ, "CHAOS_COUNTS_FILE": str(log)},
        )
        cases = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    machine = describe_machine()
    lines = [
        "",
        f"## {machine['date']}: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}",
        "",
        f"pytest exit status {run.returncode} ({'every case passed' if run.returncode == 0 else 'FAILED'}).",
        "",
        "| case | in flight | lost | recovered | seconds to recover |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for case in cases:
        lines.append(
            f"| {case['case']} | {case.get('in_flight', '-')} | {case.get('lost', '-')} "
            f"| {case.get('recovered', '-')} | {case.get('seconds_to_recover', '-')} |"
        )
    append_report(RESULTS / "chaos.md", "Chaos suite", "python -m benchmarks.chaos_report", lines, "chaos")
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
