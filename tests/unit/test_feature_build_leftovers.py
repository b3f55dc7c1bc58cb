"""What killed feature builds leave under the output folder, and how the next build clears it (no Spark:
the folders are laid out as a kill leaves them)."""

from __future__ import annotations

import subprocess
import sys

from shopsight.features import build as feature_build


def _gone_builder() -> str:
    """``<pid>-<start>`` of a process that has exited."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return f"{gone.pid}-123456"


def _partition(folder, rows: str):
    folder.mkdir(parents=True)
    (folder / "part-00000.parquet").write_text(rows)
    return folder


def test_a_day_a_killed_build_moved_aside_is_put_back_and_other_leftovers_go(tmp_path):
    out = tmp_path / "features"
    table = out / "user_activity"
    gone, me = _gone_builder(), feature_build._builder()
    # killed between its two renames: the previous day is aside, no partition in its place
    _partition(table / f".snapshot_day=2017-11-27.old-{gone}-0badf00d", "previous 27")
    # killed after them: the new partition is in place, the previous one is waste
    _partition(table / "snapshot_day=2017-11-28", "new 28")
    _partition(table / f".snapshot_day=2017-11-28.old-{gone}-0badf00d", "previous 28")
    # an earlier version's name, without its builder: that build has ended
    _partition(table / ".snapshot_day=2017-11-29.old-0badf00d", "previous 29")
    # a running build's (this process): left alone, whatever its state
    running = _partition(table / f".snapshot_day=2017-11-30.old-{me}-0badf00d", "previous 30")
    dead_staging = out / f".staging-{gone}-0badf00d"
    dead_staging.mkdir()
    live_staging = feature_build._new_staging(out)

    feature_build._remove_abandoned_staging(out)

    assert (table / "snapshot_day=2017-11-27" / "part-00000.parquet").read_text() == "previous 27"
    assert (table / "snapshot_day=2017-11-28" / "part-00000.parquet").read_text() == "new 28"
    assert (table / "snapshot_day=2017-11-29" / "part-00000.parquet").read_text() == "previous 29"
    assert sorted(p.name for p in table.iterdir()) == [
        running.name,
        "snapshot_day=2017-11-27",
        "snapshot_day=2017-11-28",
        "snapshot_day=2017-11-29",
    ]
    assert not dead_staging.exists() and live_staging.exists()
