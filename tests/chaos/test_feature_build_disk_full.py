"""The disk fills up while a feature build writes: the command fails with one line naming the folder and
"no space left on device" (no traceback, Python's or Java's), removes its staging folder, and the previous
output is left byte for byte as it was. The output folder is a small tmpfs, mounted for the case."""

from __future__ import annotations

import time

import pytest

from tests.chaos._disk import fill, tmpfs, used_bytes
from tests.chaos._feature_builds import DAYS, TABLES, build, hidden, published, simulate

pytestmark = [pytest.mark.chaos, pytest.mark.spark, pytest.mark.slow]


def test_a_full_disk_mid_build_fails_in_one_line_and_keeps_the_previous_output(tmp_path, record):
    events, other = simulate(tmp_path, seed=0), simulate(tmp_path, seed=1)
    with tmpfs(tmp_path / "small", "4m") as small:
        out = small / "features"
        first = build(tmp_path, events, out)  # room enough
        assert first.returncode == 0, first.stdout + first.stderr
        before = published(out)
        assert len(before) == DAYS * TABLES + 1

        # Room for the staged events and a quarter of the tables: the disk fills up while Spark writes.
        room = used_bytes(other) + used_bytes(out) // 4
        fill(small, leave=room)
        started = time.monotonic()
        second = build(tmp_path, other, out)  # another input: a partial publish would show
        seconds = time.monotonic() - started

        console = second.stdout + second.stderr
        assert second.returncode == 1, console
        assert "Traceback" not in console and "\tat " not in console and "Caused by" not in console, console
        (error,) = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert error.startswith(f"error: no space left on device in {out} ("), error
        assert error.endswith(f"nothing was published: the previous output under {out} is unchanged"), error
        after = published(out)
        assert after == before  # byte for byte
        assert hidden(out) == []  # no staging folder, no partition moved aside, no partial file
        record(
            in_flight=f"1 build over a previous one ({len(before)} files), {room // 1024} KiB of room",
            lost=sum(after.get(name) != digest for name, digest in before.items()),
            recovered=len(after),
            seconds_to_recover=round(seconds, 1),  # from the start of the build to its one-line error
        )
