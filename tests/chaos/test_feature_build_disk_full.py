"""The disk fills up while a feature build writes: the command fails with one line naming the folder and
"no space left on device" (no traceback, Python's or Java's), removes its staging folder, and the previous
output is left byte for byte as it was. The output folder is a small tmpfs, mounted for the case."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tests.chaos._feature_builds import DAYS, TABLES, build, hidden, published, simulate

pytestmark = [pytest.mark.chaos, pytest.mark.spark, pytest.mark.slow]


@contextmanager
def _tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` for the block (needs root); skips where it cannot be
    mounted, fails under CI."""
    folder.mkdir()
    mount = shutil.which("mount")
    done = mount and subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if not done or done.returncode != 0:
        reason = "cannot mount a tmpfs here (" + (done.stderr.strip() if done else "no mount command") + ")"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run the disk-full case as root")
        pytest.skip(f"{reason}: the disk-full case needs root")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)  # still open: detach it now


def _bytes(folder: Path) -> int:
    """Space the files under ``folder`` take (whole blocks, as a filesystem counts them)."""
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())


def test_a_full_disk_mid_build_fails_in_one_line_and_keeps_the_previous_output(tmp_path, record):
    events, other = simulate(tmp_path, seed=0), simulate(tmp_path, seed=1)
    with _tmpfs(tmp_path / "small", "4m") as small:
        out = small / "features"
        first = build(tmp_path, events, out)  # room enough
        assert first.returncode == 0, first.stdout + first.stderr
        before = published(out)
        assert len(before) == DAYS * TABLES + 1

        # Room for the staged events and a quarter of the tables: the disk fills up while Spark writes.
        room = _bytes(other) + _bytes(out) // 4
        stat = os.statvfs(small)
        with (small / "filler").open("wb") as filler:
            filler.write(b"\0" * (stat.f_bavail * stat.f_frsize - room))
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
