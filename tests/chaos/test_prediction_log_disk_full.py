"""The prediction log's spool disk fills up while answers are logged: no write fails (serving goes on),
the segment on disk holds whole records only, what the disk refused waits in memory up to its limit and is
written once there is room again, and what did not fit is counted. The spool is a small tmpfs."""

from __future__ import annotations

import logging

import pytest

from shopsight.serving.prediction_log import SEGMENT_SUFFIX, PredictionLog, read_predictions, read_segment
from tests.chaos._disk import fill, tmpfs
from tests.unit.test_prediction_log import _record

pytestmark = [pytest.mark.chaos]

BATCH = 16  # records of one batch, as @serve.batch hands them to the log


def test_a_full_spool_disk_fails_no_answer_and_keeps_what_fits_in_memory(tmp_path, caplog, record):
    destination = tmp_path / "predictions"
    with tmpfs(tmp_path / "spool", "1m") as spool:
        log = PredictionLog(spool, destination, roll_interval_s=0, max_waiting_bytes=64 * 1024)
        filler = fill(spool, leave=32 * 1024)
        caplog.set_level(logging.WARNING, logger="shopsight.serving.prediction_log")
        sent = 0
        while log.records_dropped == 0:  # past the room on disk, then past the room in memory
            log.write([_record(sent + i) for i in range(BATCH)])  # never raises: the answer goes out
            sent += BATCH
            assert sent < 100_000, "the disk never filled up"
        for _ in range(3):
            log.write([_record(sent + i) for i in range(BATCH)])
            sent += BATCH
        written, waiting, dropped = log.records_written, log.records_waiting, log.records_dropped
        assert written > 0 and waiting > 0 and dropped == 4 * BATCH
        assert written + waiting + dropped == sent
        (segment,) = spool.glob(f"*{SEGMENT_SUFFIX}")
        on_disk = read_segment(segment.read_bytes(), segment)
        assert len(on_disk) == written  # whole records only: a cut write was taken back
        assert [r[0] for r in on_disk] == [f"r{n}" for n in range(written)]
        refusals = [r.getMessage() for r in caplog.records if "refuses writes" in r.getMessage()]
        assert len(refusals) == 1 and "No space left on device" in refusals[0], refusals

        filler.unlink()  # room again: the next write writes what waited first, in order
        log.write([_record(sent + i) for i in range(BATCH)])
        sent += BATCH
        assert log.records_waiting == 0
        log.close()
    logged = read_predictions(destination).column("request_id").to_pylist()
    lost = {f"r{n}" for n in range(sent)} - set(logged)
    record(
        in_flight=f"{sent} records logged in batches of {BATCH} while the spool disk filled up",
        lost=len(lost),
        recovered=waiting,
        seconds_to_recover=0,
    )
    assert len(logged) == len(set(logged)) == sent - dropped
    # the dropped are the batches that came while 64 KiB already waited, nothing else
    first_dropped = written + waiting
    assert lost == {f"r{n}" for n in range(first_dropped, first_dropped + dropped)}
    assert any("takes writes again; 64 records were dropped" in r.getMessage() for r in caplog.records)
