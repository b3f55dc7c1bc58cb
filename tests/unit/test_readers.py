"""Readers: every row checked, bad rows quarantined with their line and reason, good rows on."""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections import Counter
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shopsight.data import DayPartitionedWriter, EventReader, EventStats, TimeWindow, quarantine_file
from shopsight.data.schema import EVENT_SCHEMA
from shopsight.platform import DataSettings, InputFormatError

WINDOW = TimeWindow.from_settings(DataSettings())  # Taobao's 9 days, China time
IN_WINDOW = 1511600000  # 2017-11-25 16:53 China time


def _expected_from_raw(path):
    """Independent reading of a clean Taobao CSV: (good rows, out-of-window line numbers)."""
    lo, hi = WINDOW.bounds_seconds()
    good, outside = [], []
    with open(path) as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if lo <= int(row[4]) < hi:
                good.append(row)
            else:
                outside.append(number)
    return good, outside


def _read_quarantine(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_taobao_sample_quarantines_exactly_the_out_of_window_rows(taobao_sample, tmp_path):
    good, outside = _expected_from_raw(taobao_sample)
    assert outside, "the sample is known to hold a few out-of-window events"
    reader = EventReader(taobao_sample, window=WINDOW, quarantine=tmp_path / "q.csv")
    table = reader.read_all()

    assert reader.format == "taobao"
    assert table.schema == EVENT_SCHEMA
    assert reader.report.rows_read == 10_000
    assert reader.report.rows_good == table.num_rows == len(good) == 10_000 - len(outside)
    assert reader.report.rejected == Counter({"out_of_window": len(outside)})
    rows = _read_quarantine(tmp_path / "q.csv")
    assert [int(r["source_row"]) for r in rows] == outside
    lines = taobao_sample.read_text().splitlines()
    assert all(r["raw"] == lines[int(r["source_row"]) - 1] for r in rows)

    assert table.column("user_id").to_pylist() == [int(r[0]) for r in good]
    assert table.column("item_id").to_pylist() == [int(r[1]) for r in good]
    assert table.column("category_id").to_pylist() == [int(r[2]) for r in good]
    assert Counter(table.column("behavior").to_pylist()) == Counter(r[3] for r in good)
    assert table.column("ts")[0].as_py() == datetime.fromtimestamp(int(good[0][4]), UTC)


def test_gzip_and_small_batches_give_the_same_rows(taobao_sample, tmp_path):
    plain = EventReader(taobao_sample, window=WINDOW).read_all()
    gz = tmp_path / "sample.csv.gz"
    gz.write_bytes(gzip.compress(taobao_sample.read_bytes()))
    reader = EventReader(gz, window=WINDOW, batch_rows=500)
    batches = list(reader)
    assert len(batches) > 1
    assert pa.concat_tables(batches).equals(plain)


BAD_LINES = [
    (f"1,10,100,pv,{IN_WINDOW}", None),
    ("2,20,200,pv", "wrong_field_count"),
    (f"3,x30,300,pv,{IN_WINDOW}", "non_numeric_id"),
    (f"4,40,400,like,{IN_WINDOW}", "unknown_behavior"),
    (f"5,50,500,buy,{IN_WINDOW},extra", "wrong_field_count"),
    ("6,60,600,cart,yesterday", "bad_timestamp"),
    ("7,70,700,fav,1000000000", "out_of_window"),
    (f"-8,80,800,pv,{IN_WINDOW}", "non_numeric_id"),
    (f"9,90,900,buy,{IN_WINDOW}", None),
    (f",91,901,buy,{IN_WINDOW}", "non_numeric_id"),
    (f"10,100,1000,cart,{IN_WINDOW + 60}", None),
]


def test_hand_made_bad_rows_are_each_quarantined_with_their_line_and_reason(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(line for line, _ in BAD_LINES) + "\n")
    reader = EventReader(path, "taobao", window=WINDOW, quarantine=tmp_path / "q.csv", batch_rows=2)
    table = reader.read_all()

    assert table.column("user_id").to_pylist() == [1, 9, 10]
    assert table.column("behavior").to_pylist() == ["pv", "buy", "cart"]
    expected = [(n, reason) for n, (_, reason) in enumerate(BAD_LINES, start=1) if reason]
    rows = _read_quarantine(tmp_path / "q.csv")
    assert sorted((int(r["source_row"]), r["reason"]) for r in rows) == expected
    by_line = {int(r["source_row"]): r for r in rows}
    assert all(by_line[n]["raw"] == BAD_LINES[n - 1][0] for n, _ in expected)
    assert reader.report.rows_read == len(BAD_LINES)
    assert reader.report.rows_rejected == len(expected) == 8
    assert reader.report.rejected["wrong_field_count"] == 2


def test_without_rejects_no_quarantine_file_is_left(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text(f"1,2,3,pv,{IN_WINDOW}\n")
    stale = tmp_path / "q.csv"
    stale.write_text("from an earlier run\n")
    reader = EventReader(path, window=WINDOW, quarantine=stale)
    assert reader.read_all().num_rows == 1
    assert reader.report.quarantine_path is None
    assert not stale.exists()


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.csv", b"", "empty"),
        ("blank.csv", b"\n\n  \n", "no rows"),
        ("binary.csv", bytes(range(256)) * 4, "binary"),
        ("events.json", b'[{"user_id": 1, "item_id": 2}]', "JSON"),
        ("header.csv", b"user,item,category,behavior,ts\nfoo,bar,baz,qux,quux\n", "not Taobao"),
    ],
)
def test_files_not_in_the_format_stop_with_a_one_line_error(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputFormatError) as info:
        list(EventReader(path, "taobao"))
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_parquet_declared_as_csv_and_csv_declared_as_parquet(tmp_path):
    pq.write_table(EVENT_SCHEMA.empty_table(), tmp_path / "e.parquet")
    with pytest.raises(InputFormatError, match="parquet file, not text"):
        EventReader(tmp_path / "e.parquet", "taobao")
    (tmp_path / "e.csv").write_text(f"1,2,3,pv,{IN_WINDOW}\n")
    with pytest.raises(InputFormatError, match="not a parquet file"):
        EventReader(tmp_path / "e.csv", "parquet")
    with pytest.raises(InputFormatError, match="no such file"):
        EventReader(tmp_path / "missing.csv")


def test_sasrec_games_file(sasrec_games):
    reader = EventReader(sasrec_games)
    table = reader.read_all()
    assert reader.format == "sasrec"
    assert table.num_rows == 287_107 and reader.report.rows_rejected == 0
    assert len(set(table.column("user_id").to_pylist())) == 31_013
    assert len(set(table.column("item_id").to_pylist())) == 23_715
    first = sasrec_games.read_text().splitlines()[0].split()
    assert table.slice(0, 1).to_pylist()[0]["user_id"] == int(first[0])
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    assert (ts[1:] > ts[:-1]).all(), "line order is kept as time order"


def test_sasrec_bad_lines(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("1 10\n1 11 7\n2 x\n2 20\n")
    reader = EventReader(path, "sasrec", quarantine=tmp_path / "q.csv")
    table = reader.read_all()
    assert table.column("item_id").to_pylist() == [10, 20]
    assert table.column("ts").cast(pa.int64()).to_pylist() == [1_000_000, 4_000_000]  # lines 1 and 4
    assert sorted((int(r["source_row"]), r["reason"]) for r in _read_quarantine(tmp_path / "q.csv")) == [
        (2, "wrong_field_count"),
        (3, "non_numeric_id"),
    ]


def test_parquet_file_and_day_partitioned_folder_round_trip(taobao_sample, tmp_path):
    events = EventReader(taobao_sample, window=WINDOW).read_all()
    pq.write_table(events, tmp_path / "one.parquet")
    assert EventReader(tmp_path / "one.parquet", window=WINDOW).read_all().equals(events)

    writer = DayPartitionedWriter(tmp_path / "events", "Asia/Shanghai", flush_rows=3000)
    for batch in events.to_batches(max_chunksize=1000):
        writer.add(pa.Table.from_batches([batch]))
    writer.close()
    assert writer.rows_written == events.num_rows
    assert sorted(writer.days) == [f"2017-11-{d}" for d in range(25, 31)] + [
        "2017-12-01",
        "2017-12-02",
        "2017-12-03",
    ]
    back = EventReader(tmp_path / "events", window=WINDOW).read_all()
    key = [("user_id", "ascending"), ("ts", "ascending"), ("item_id", "ascending"), ("behavior", "ascending")]
    assert back.sort_by(key).equals(events.sort_by(key))


def test_parquet_with_bad_values_is_checked_row_by_row(tmp_path):
    table = pa.table(
        {
            "user_id": pa.array(["1", "2", "x", "4", "5"]),
            "item_id": pa.array([10, 20, 30, -40, 50]),
            "category_id": pa.array([1, 1, 1, 1, None]),
            "behavior": pa.array(["pv", "look", "pv", "buy", "fav"]),
            "ts": pa.array([IN_WINDOW] * 5),
        }
    )
    pq.write_table(table, tmp_path / "bad.parquet")
    reader = EventReader(tmp_path / "bad.parquet", window=WINDOW, quarantine=tmp_path / "q.csv")
    good = reader.read_all()
    assert good.column("user_id").to_pylist() == [1]
    rows = {int(r["source_row"]): r for r in _read_quarantine(tmp_path / "q.csv")}
    assert {n: r["reason"] for n, r in rows.items()} == {
        1: "unknown_behavior",
        2: "non_numeric_id",
        3: "non_numeric_id",
        4: "missing_value",
    }
    assert json.loads(rows[2]["raw"])["user_id"] == "x"


def test_parquet_missing_columns_or_wrong_types_stop(tmp_path):
    pq.write_table(pa.table({"user_id": [1], "item_id": [2]}), tmp_path / "narrow.parquet")
    with pytest.raises(InputFormatError, match="lack column.*category_id"):
        list(EventReader(tmp_path / "narrow.parquet"))
    wrong = pa.table(
        {"user_id": [1.5], "item_id": [2], "category_id": [3], "behavior": ["pv"], "ts": [IN_WINDOW]}
    )
    pq.write_table(wrong, tmp_path / "wrong.parquet")
    with pytest.raises(InputFormatError, match="user_id is double"):
        list(EventReader(tmp_path / "wrong.parquet"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputFormatError, match="no .parquet files"):
        EventReader(tmp_path / "empty_dir")


# -- edges of real files ------------------------------------------------------------------------------


def _lines(n: int) -> list[str]:
    return [f"{i},{1000 + i},{i % 7},pv,{IN_WINDOW + i}" for i in range(1, n + 1)]


@pytest.mark.parametrize("rows", [40, 30_000])  # within the format sniff's first block, and far past it
def test_truncated_gzip_keeps_the_complete_rows_and_reports_the_break(tmp_path, rows):
    whole = gzip.compress(("\n".join(_lines(rows)) + "\n").encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(whole[: len(whole) * 2 // 3])
    # what the cut file holds, decoded independently: its complete lines, then a part of one
    text = zlib.decompressobj(wbits=31).decompress(path.read_bytes()).decode()
    complete, partial = text[: text.rfind("\n") + 1].splitlines(), text[text.rfind("\n") + 1 :]
    assert 0 < len(complete) < rows

    reader = EventReader(path, window=WINDOW, quarantine=tmp_path / "q.csv", batch_rows=1000)
    table = reader.read_all()

    assert table.column("user_id").to_pylist() == [int(line.split(",")[0]) for line in complete]
    assert reader.report.rejected == Counter({"truncated_input": 1})
    assert reader.report.rows_read == len(complete) + 1
    [row] = _read_quarantine(tmp_path / "q.csv")
    assert (int(row["source_row"]), row["reason"], row["raw"]) == (
        len(complete) + 1,
        "truncated_input",
        partial,
    )
    [warning] = reader.report.warnings
    assert "truncated" in warning and f"line {len(complete):,}" in warning and "\n" not in warning
    assert reader.report.notes["warning"] == warning


def test_a_gzip_cut_before_its_first_line_is_a_one_line_error(tmp_path):
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(gzip.compress(("\n".join(_lines(3)) + "\n").encode())[:15])
    with pytest.raises(InputFormatError, match="cannot be read") as info:
        EventReader(path, "taobao")
    assert "\n" not in str(info.value)


def test_millisecond_timestamps_are_bad_timestamps_in_parquet_as_in_csv(tmp_path):
    millis = IN_WINDOW * 1000
    (tmp_path / "ms.csv").write_text(
        f"1,10,100,pv,{IN_WINDOW}\n2,20,200,pv,{millis}\n3,30,300,pv,999999999999\n"
    )
    for ts in (
        pa.array([IN_WINDOW, millis, 999_999_999_999], pa.int64()),
        pa.array([IN_WINDOW, millis, 999_999_999_999], pa.timestamp("s")),
        pa.array([IN_WINDOW, millis, 2**63 - 1], pa.uint64()),
    ):
        events = {"user_id": [1, 2, 3], "item_id": [10, 20, 30], "category_id": [100, 200, 300]}
        pq.write_table(pa.table({**events, "behavior": ["pv"] * 3, "ts": ts}), tmp_path / "ms.parquet")
        for name in ("ms.csv", "ms.parquet"):
            reader = EventReader(tmp_path / name, quarantine=tmp_path / "q.csv")  # no window
            stats = EventStats()
            for table in reader:
                stats.update(table)
            assert reader.report.rejected == Counter({"bad_timestamp": 2}), (name, ts.type)
            assert stats.events == 1 and stats.last_ts == datetime.fromtimestamp(IN_WINDOW, UTC)
            # CSV lines count from 1, parquet rows from 0
            rejected_rows = [2, 3] if name.endswith(".csv") else [1, 2]
            assert [int(r["source_row"]) for r in _read_quarantine(tmp_path / "q.csv")] == rejected_rows


def test_ids_up_to_int64_max_are_accepted(tmp_path):
    top = 2**63 - 1
    lines = [f"{top},{top},{top},pv", f"{top + 1},1,1,pv", "1,99999999999999999999,1,pv"]
    (tmp_path / "ids.csv").write_text("".join(f"{line},{IN_WINDOW}\n" for line in lines))
    reader = EventReader(tmp_path / "ids.csv", window=WINDOW)
    assert reader.read_all().column("user_id").to_pylist() == [top]
    assert reader.report.rejected == Counter({"non_numeric_id": 2})

    ids = {"item_id": [1, 2], "category_id": [3, 4], "behavior": ["pv", "pv"], "ts": [IN_WINDOW] * 2}
    for user_ids in (pa.array([top, top + 1], pa.uint64()), pa.array([str(top), str(top + 1)])):
        pq.write_table(pa.table({"user_id": user_ids, **ids}), tmp_path / "ids.parquet")
        reader = EventReader(tmp_path / "ids.parquet", window=WINDOW)
        assert reader.read_all().column("user_id").to_pylist() == [top], user_ids.type
        assert reader.report.rejected == Counter({"non_numeric_id": 1})


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_blank_lines_are_counted_and_rows_keep_their_file_line(tmp_path, newline):
    lines = ["", f"1,10,100,pv,{IN_WINDOW}", "", "", "2,20,200,pv", "   ", f"3,30,300,like,{IN_WINDOW}", ""]
    lines += [f"4,40,400,buy,{IN_WINDOW}"]
    path = tmp_path / "blank.csv"
    path.write_bytes(newline.join(lines).encode() + b"\n")
    reader = EventReader(path, window=WINDOW, quarantine=tmp_path / "q.csv", batch_rows=2)
    assert reader.read_all().column("user_id").to_pylist() == [1, 4]
    report = reader.report
    assert report.blank_lines == 5 and report.notes["blank lines"].startswith("5 ")
    assert report.rows_read == 4 and report.rows_rejected == 2  # blank lines are not rows
    rows = _read_quarantine(tmp_path / "q.csv")
    assert sorted((int(r["source_row"]), r["reason"]) for r in rows) == [
        (5, "wrong_field_count"),
        (7, "unknown_behavior"),
    ]


def test_quarantine_files_of_inputs_with_the_same_name_differ(tmp_path):
    a, b = tmp_path / "a" / "events.csv", tmp_path / "b" / "events.csv"
    first = quarantine_file(tmp_path / "q", a)
    assert first != quarantine_file(tmp_path / "q", b)
    assert first == quarantine_file(tmp_path / "q", a) and first.parent == tmp_path / "q"
    assert first.name.startswith("events.csv.") and first.name.endswith(".rejected.csv")
