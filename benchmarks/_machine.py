"""The machine a benchmark ran on, for the recorded results."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime

import psutil


def describe_machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def append_report(path, title: str, command: str, lines: list[str], target: str = "bench") -> None:
    """Append a dated section to a results file, creating it with its title on first use."""
    if not path.exists():
        path.write_text(f"# {title}\n\n`make {target}` ({command}); newest last.\n")
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"recorded in {path}")
