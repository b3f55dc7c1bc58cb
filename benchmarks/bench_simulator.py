"""Simulator benchmark: events per second and peak memory at about 1M and 10M events.

Each size runs in a fresh process so that its peak resident memory is its own. The ratio of the
peak memory at 10M to that at 1M shows the streaming: a simulator that held every event would
need about ten times more. Results go to benchmarks/results/simulator.md (appended) and a JSON file.

    python -m benchmarks.bench_simulator [--sizes 1000000 10000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._machine import append_report, describe_machine

RESULTS = Path(__file__).parent / "results"
EVENTS_PER_USER = 90  # the simulator's mean over 9 days, measured; sizes are approximate


def _one(users: int, out: Path) -> dict:
    from shopsight.data import SimulatorConfig, simulate

    result = simulate(SimulatorConfig(users=users, days=9, seed=0), out)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "users": users,
        "events": result.events,
        "seconds": result.seconds,
        "peak_rss_mb": peak_mb,
        "files": result.files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="target event counts"
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: users
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.out)))
        return

    rows = []
    for size in args.sizes:
        users = max(1, round(size / EVENTS_PER_USER))
        with tempfile.TemporaryDirectory() as tmp:
            child = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_simulator",
                    "--one",
                    str(users),
                    "--out",
                    f"{tmp}/s",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
        row = json.loads(child.stdout.strip().splitlines()[-1])
        row["events_per_second"] = row["events"] / row["seconds"]
        rows.append(row)
        print(
            f"{row['events']:>12,} events  {row['events_per_second']:>12,.0f} events/s  "
            f"peak {row['peak_rss_mb']:,.0f} MB  ({row['seconds']:.1f} s)"
        )

    machine = describe_machine()
    RESULTS.mkdir(exist_ok=True)
    stamp = machine["date"][:10]
    (RESULTS / f"simulator-{stamp}.json").write_text(
        json.dumps({"machine": machine, "runs": rows}, indent=2) + "\n"
    )
    lines = [
        f"\n## {machine['date']}: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}, "
        f"Python {machine['python']}\n",
        "| events | users | events/s | peak RSS (MB) | parquet files | seconds |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['events']:,} | {r['users']:,} | {r['events_per_second']:,.0f} | {r['peak_rss_mb']:,.0f} | "
        f"{r['files']} | {r['seconds']:.1f} |"
        for r in rows
    ]
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        lines.append(
            f"\nSide by side in this run: {large['events'] / small['events']:.1f}x the events took "
            f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x the peak memory and ran at "
            f"{large['events_per_second'] / small['events_per_second']:.2f}x the speed."
        )
    append_report(
        RESULTS / "simulator.md", "Simulator benchmark", "python -m benchmarks.bench_simulator", lines
    )


if __name__ == "__main__":
    main()
