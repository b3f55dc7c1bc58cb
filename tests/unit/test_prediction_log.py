"""The prediction log's spool: a killed writer loses no record it wrote, a cut record is dropped, a live
writer's segment is left alone, a roll repeated after a crash counts nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

from shopsight.serving.prediction_log import (
    FIELDS,
    PredictionLog,
    _write_parquet,
    collect,
    micros,
    read_predictions,
    read_segment,
)

T0 = datetime(2026, 11, 30, 23, 59, 58, tzinfo=UTC)


def _record(n: int, task: str = "purchase", at: datetime = T0) -> tuple:
    values = {
        "request_id": f"r{n}",
        "time": micros(at),
        "team": "team_a",
        "task": task,
        "model": "shopsight-purchase",
        "version": "3",
        "alias": "champion",
        "user_id": n,
        "as_of": micros(at),
        "features": {"n_pv_1d": n, "top_categories": [1, 2]},
        "items": None,
        "scores": None,
        "probability": 0.25,
        "source": "model",
        "features_unavailable": False,
        "latency_ms": 1.5,
    }
    return tuple(values[name] for name in FIELDS)


WRITER = textwrap.dedent(
    """
    import sys
    from tests.unit.test_prediction_log import _record
    from shopsight.serving.prediction_log import PredictionLog

    log = PredictionLog(sys.argv[1], sys.argv[2], roll_interval_s=0)
    n = 0
    while True:
        log.write([_record(n + i) for i in range(7)])
        n += 7
        print(n, flush=True)  # acknowledged: as an answer leaves the replica after its write
    """
)


def test_a_killed_writer_loses_no_record_it_acknowledged(tmp_path):
    spool, destination = tmp_path / "spool", tmp_path / "predictions"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(spool), str(destination)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    acknowledged = 0
    for line in writer.stdout:
        acknowledged = int(line)
        if acknowledged >= 7 * 300:
            break
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    converted = collect(spool, str(destination))
    # every acknowledged record, and at most the batches written after the last line was read
    assert converted >= acknowledged
    table = read_predictions(destination)
    assert table.num_rows == converted
    ids = table.column("request_id").to_pylist()
    assert len(set(ids)) == len(ids) and {f"r{n}" for n in range(acknowledged)} <= set(ids)
    assert not list(spool.glob("*.msgpack"))  # converted and removed


def test_a_record_cut_by_a_kill_is_dropped_and_the_others_kept(tmp_path):
    log = PredictionLog(tmp_path / "spool", tmp_path / "out", roll_interval_s=0)
    log.write([_record(1), _record(2)])
    with open(log._path, "ab") as segment:  # a third record, cut in the middle of its write
        import msgpack

        segment.write(msgpack.packb(_record(3))[:40])
    records = read_segment(log._path.read_bytes())
    assert [r[FIELDS.index("user_id")] for r in records] == [1, 2]
    log.close()
    assert read_predictions(tmp_path / "out").column("user_id").to_pylist() == [1, 2]


def test_a_live_writers_segment_is_left_to_it_and_a_repeated_roll_counts_nothing_twice(tmp_path):
    spool, out = tmp_path / "spool", tmp_path / "out"
    live = PredictionLog(spool, out, roll_interval_s=0)
    live.write([_record(1)])
    assert collect(spool, str(out)) == 0  # another replica's roll: the segment is held, so not touched
    assert live.roll() == 1
    # a roll killed after writing a segment's parquet file and before deleting the segment: the next roll
    # converts it again, to the same file name
    dead = PredictionLog(spool, out, roll_interval_s=0)
    dead.write([_record(2), _record(3)])
    os.close(dead._fd)  # its writer is gone: the segment is closed
    dead._fd = None
    _write_parquet(dead._path.stem, read_segment(dead._path.read_bytes()), str(out), None)
    assert read_predictions(out).num_rows == 3
    assert collect(spool, str(out)) == 2
    assert read_predictions(out).num_rows == 3 and len(list(out.rglob("*.parquet"))) == 2
    live.close()


def test_records_are_rolled_by_task_and_day_and_read_back_by_window(tmp_path):
    log = PredictionLog(tmp_path / "spool", tmp_path / "out", roll_interval_s=0)
    after_midnight = T0 + timedelta(seconds=5)
    log.write([_record(1), _record(2, "churn"), _record(3, at=after_midnight)])
    log.close()
    folders = sorted(
        p.parent.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.parquet")
    )
    assert folders == [
        "task=churn/date=2026-11-30",
        "task=purchase/date=2026-11-30",
        "task=purchase/date=2026-12-01",
    ]
    assert read_predictions(tmp_path / "out").num_rows == 3
    window = read_predictions(tmp_path / "out", start=T0 + timedelta(seconds=1), tasks=["purchase"])
    assert window.column("user_id").to_pylist() == [3]
    assert read_predictions(tmp_path / "out", tasks=["next_item"]).num_rows == 0
    assert read_predictions(tmp_path / "nothing-here").num_rows == 0


def test_the_log_rolls_to_an_object_store_and_the_monitor_reads_it_back(tmp_path, monkeypatch):
    """The cluster profile's destination, ``s3://`` on ``object_store.endpoint_url``, through pyarrow's S3
    filesystem against an S3 server on loopback (moto's, an S3 emulator: MinIO's server does not install
    from the package registries): the rolled files land under the bucket by task and day, and are read
    back with the same settings."""
    import boto3
    from moto.server import ThreadedMotoServer

    from shopsight.platform import load_settings
    from shopsight.serving.prediction_log import prediction_log_destination

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name, value in {"AWS_ACCESS_KEY_ID": "shopsight", "AWS_SECRET_ACCESS_KEY": "shopsight-secret",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="shopsight")
        settings = load_settings(
            overrides={"object_store.endpoint_url": endpoint,
                       "serving.prediction_log_path": "s3://shopsight/predictions"},
            environ={},
        ).settings  # fmt: skip
        destination, filesystem = prediction_log_destination(settings)
        assert destination == "s3://shopsight/predictions" and filesystem is not None
        log = PredictionLog(tmp_path / "spool", destination, roll_interval_s=0, filesystem=filesystem)
        log.write([_record(n) for n in range(5)])
        log.write([_record(n, task="churn") for n in range(5, 8)])
        log.close()
        keys = sorted(o["Key"] for o in boto3.client("s3", endpoint_url=endpoint)
                      .list_objects_v2(Bucket="shopsight")["Contents"])  # fmt: skip
        assert [k.rsplit("/", 1)[0] for k in keys if k.endswith(".parquet")] == [
            f"predictions/task=churn/date={T0.date()}",
            f"predictions/task=purchase/date={T0.date()}",
        ]
        purchase = read_predictions(destination, tasks=["purchase"], filesystem=filesystem)
        assert purchase.column("request_id").to_pylist() == [f"r{n}" for n in range(5)]
        assert read_predictions(destination, filesystem=filesystem).num_rows == 8
        assert not list((tmp_path / "spool").glob("*.msgpack"))  # rolled: nothing left on the replica
    finally:
        server.stop()


def test_turning_the_log_off_rolls_what_was_spooled_at_once(tmp_path):
    """A replica reconfigured with ``prediction_log: false`` rolls at once (the records reach the log, and
    no roll of them runs later while the log is off); other reconfigurations leave the spool to the timer."""
    from shopsight.serving.deploy import _roll_if_turned_off

    destination = tmp_path / "predictions"
    log = PredictionLog(tmp_path / "spool", destination, roll_interval_s=0)
    log.write([_record(n) for n in range(5)])
    for config in ({"canary_share": 0.3}, {"prediction_log": True}):
        _roll_if_turned_off(config, log)
        assert not destination.exists(), config
    _roll_if_turned_off({"prediction_log": False, "canary_share": 0.0}, log)
    assert sorted(read_predictions(destination).column("user_id").to_pylist()) == list(range(5))
    log.close()


def test_the_conversion_runs_in_a_lower_priority_process_restarted_after_a_kill(tmp_path):
    """The conversion's Python work never holds the replica's interpreter lock: a process of its own,
    nicer than the replica, does it; killed, the next roll starts another and loses nothing."""
    destination = tmp_path / "predictions"
    log = PredictionLog(tmp_path / "spool", destination, roll_interval_s=0)
    log.write([_record(n) for n in range(3)])
    assert log.roll() == 3
    converter = log._converter._process
    assert converter is not None and converter.pid != os.getpid() and converter.poll() is None
    assert os.getpriority(os.PRIO_PROCESS, converter.pid) > os.getpriority(os.PRIO_PROCESS, 0)
    os.kill(converter.pid, signal.SIGKILL)
    converter.wait()
    log.write([_record(n) for n in range(3, 8)])
    assert log.roll() == 5
    assert log._converter._process.pid != converter.pid
    log.close()
    assert converter.returncode is not None and log._converter._process is None
    assert sorted(read_predictions(destination).column("user_id").to_pylist()) == list(range(8))
