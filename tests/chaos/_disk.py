"""A small disk for the disk-full cases: a tmpfs mounted for the block, and how much room files take."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
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


def used_bytes(folder: Path) -> int:
    """Space the files under ``folder`` take (whole blocks, as a filesystem counts them)."""
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())


def fill(folder: Path, leave: int) -> Path:
    """A file that takes all of ``folder``'s free space but ``leave`` bytes."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    with filler.open("wb") as out:
        out.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler
