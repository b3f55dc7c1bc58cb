"""Spark feature jobs on the real Taobao sample, checked against an independent pandas computation."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest

from shopsight.data import EventReader, TimeWindow, quarantine_file
from shopsight.features import build as feature_build
from shopsight.features.build import KEYS, TABLES, build_features
from shopsight.platform import DataSettings, ShopsightError

pytestmark = pytest.mark.spark

TZ = "Asia/Shanghai"
START, END = date(2017, 11, 25), date(2017, 12, 2)
WINDOWS = (1, 3, 7)


@pytest.fixture(scope="module")
def built(taobao_features):
    return taobao_features


@pytest.fixture(scope="module")
def raw(taobao_sample):
    """The sample's rows inside Taobao's window, straight from the CSV (no shopsight code)."""
    df = pd.read_csv(taobao_sample, names=["user_id", "item_id", "category_id", "behavior", "ts"])
    window = TimeWindow.from_settings(DataSettings())
    lo, hi = window.bounds_seconds()
    df = df[(df.ts >= lo) & (df.ts < hi)].copy()
    df["local"] = pd.to_datetime(df.ts, unit="s", utc=True).dt.tz_convert(TZ)
    df["day"] = df["local"].dt.date
    return df.sort_values(["user_id", "ts", "item_id", "behavior"], kind="stable").reset_index(drop=True)


def _table(settings, name):
    return pd.read_parquet(settings.data_dir.absolute() / "features" / name)


def _snapshot_seconds(day: date) -> int:
    return int(pd.Timestamp(day + timedelta(days=1), tz=TZ).timestamp())


def _expected_activity(user_events: pd.DataFrame, day: date) -> dict:
    ev = user_events[user_events.day <= day].copy()
    gap = ev.ts.diff()
    ev["start"] = gap.isna() | (gap > 30 * 60)
    out = {}
    for w in WINDOWS:
        win = ev[ev.day > day - timedelta(days=w)]
        for b in ("pv", "cart", "fav", "buy"):
            out[f"n_{b}_{w}d"] = int((win.behavior == b).sum())
        out[f"n_items_{w}d"] = win.item_id.nunique()
        out[f"n_categories_{w}d"] = win.category_id.nunique()
        out[f"active_days_{w}d"] = win.day.nunique()
        sessions = int(win.start.sum())
        out[f"n_sessions_{w}d"] = sessions
        out[f"mean_session_events_{w}d"] = len(win) / sessions if sessions else 0.0
        out[f"cvr_buy_pv_{w}d"] = (out[f"n_buy_{w}d"] + 1) / (out[f"n_pv_{w}d"] + 45)
        out[f"cvr_buy_cart_{w}d"] = (out[f"n_buy_{w}d"] + 1.1) / (out[f"n_cart_{w}d"] + 3)
    snapshot = _snapshot_seconds(day)
    for b in ("pv", "cart", "fav", "buy"):
        last = ev.loc[ev.behavior == b, "ts"].max()
        out[f"hours_since_{b}"] = None if pd.isna(last) else (snapshot - last) / 3600
    wide = ev[ev.day > day - timedelta(days=7)]
    hours = wide.local.dt.hour
    for name, lo, hi in (("night", 0, 6), ("morning", 6, 12), ("afternoon", 12, 18), ("evening", 18, 24)):
        out[f"share_{name}"] = ((hours >= lo) & (hours < hi)).mean() if len(wide) else 0.0
    counts = wide.groupby("category_id").size().reset_index(name="n")
    counts = counts.sort_values(["n", "category_id"], ascending=[False, True])
    out["top_categories"] = counts.category_id.head(3).tolist()
    out["top_category_share"] = counts.n.iloc[0] / len(wide) if len(wide) else 0.0
    # carted and not bought since (same-second ties: the buy sorts first, as in the event order)
    funnel = ev[ev.behavior.isin(["cart", "buy"])].sort_values(["ts", "behavior"])
    open_items = set()
    for row in funnel.itertuples():
        (open_items.add if row.behavior == "cart" else open_items.discard)(row.item_id)
    out["n_carted_not_bought"] = len(open_items)
    return out


def _pick_users(raw: pd.DataFrame) -> list[int]:
    per_user = raw.groupby("user_id").agg(n=("ts", "size"), buys=("behavior", lambda b: (b == "buy").sum()))
    heavy = per_user.n.idxmax()
    light = per_user.n.idxmin()
    buyer = per_user[per_user.buys > 1].n.idxmax()
    carter = raw[raw.behavior == "cart"].user_id.value_counts().index[0]
    return sorted({int(heavy), int(light), int(buyer), int(carter), int(per_user.index[len(per_user) // 2])})


def test_user_activity_equals_an_independent_computation(built, raw):
    settings, _ = built
    activity = _table(settings, "user_activity")
    users = _pick_users(raw)
    checked = 0
    for user in users:
        events = raw[raw.user_id == user]
        for day in (START, date(2017, 11, 28), END):
            row = activity[
                (activity.user_id == user) & (activity.snapshot_day.astype(str) == day.isoformat())
            ]
            if events.day.min() > day:
                assert row.empty, f"user {user} has a row before their first event"
                continue
            assert len(row) == 1
            row = row.iloc[0]
            for key, want in _expected_activity(events, day).items():
                got = row[key]
                if want is None:
                    assert pd.isna(got), (user, day, key)
                elif isinstance(want, list):
                    assert list(got) == want, (user, day, key)
                else:
                    assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (user, day, key, got, want)
            checked += 1
    assert checked >= 10


def test_user_sequence_is_the_last_50_events_before_the_snapshot(built, raw):
    settings, _ = built
    seq = _table(settings, "user_sequence")
    for user in _pick_users(raw):
        events = raw[raw.user_id == user]
        for day in (START, date(2017, 11, 29), END):
            before = events[events.day <= day].tail(50)
            row = seq[(seq.user_id == user) & (seq.snapshot_day.astype(str) == day.isoformat())]
            if before.empty:
                assert row.empty
                continue
            row = row.iloc[0]
            assert list(row.seq_item_ids) == before.item_id.tolist()
            assert list(row.seq_category_ids) == before.category_id.tolist()
            assert list(row.seq_behaviors) == before.behavior.tolist()
            assert list(row.seq_ts) == before.ts.tolist()
            assert row.seq_length == len(before)


def test_no_leakage_and_labels_from_the_next_day_only(built, raw):
    settings, _ = built
    seq = _table(settings, "user_sequence")
    snapshot = seq.snapshot_ts.map(lambda t: t.timestamp())
    assert all(max(ts) < s for ts, s in zip(seq.seq_ts, snapshot, strict=True))
    activity = _table(settings, "user_activity")
    for b in ("pv", "cart", "fav", "buy"):
        assert (activity[f"hours_since_{b}"].dropna() > 0).all()

    labels = _table(settings, "labels")
    buy_days = set(
        zip(raw.loc[raw.behavior == "buy", "user_id"], raw.loc[raw.behavior == "buy", "day"], strict=True)
    )
    first_day = raw.groupby("user_id").day.min()
    expected = {
        (u, d): (u, d + timedelta(days=1)) in buy_days
        for u, first in first_day.items()
        for d in (START + timedelta(days=i) for i in range((END - START).days + 1))
        if first <= d
    }
    got = {
        (r.user_id, date.fromisoformat(str(r.snapshot_day))): bool(r.buy_next_1d) for r in labels.itertuples()
    }
    assert got == expected
    assert 0.05 < np.mean(list(got.values())) < 0.5

    # churn_3d: no event on D+1 .. D+3; unknown (null) where D+3 is past the last day with events (12-03)
    active_days = set(zip(raw.user_id, raw.day, strict=True))
    last = raw.day.max()
    want = {
        key: None
        if key[1] + timedelta(days=3) > last
        else not any((key[0], key[1] + timedelta(days=k)) in active_days for k in (1, 2, 3))
        for key in expected
    }
    day = labels.snapshot_day.astype(str).map(date.fromisoformat)
    churn = {
        (u, d): None if pd.isna(c) else bool(c)
        for u, d, c in zip(labels.user_id, day, labels.churn_3d, strict=True)
    }
    assert churn == want
    assert {d for (_, d), v in churn.items() if v is None} == {date(2017, 12, 1), date(2017, 12, 2)}
    assert 0.01 < np.mean([v for v in churn.values() if v is not None]) < 0.5  # the sample's: 3.4%


def test_churn_label_on_hand_written_events(spark):
    """``churn_3d`` on a few users whose days are known by heart, censored where D+3 is not observed."""
    from pyspark.sql import functions as F

    from shopsight.features import jobs

    rows = [  # user, behaviour, shop-local time (the session's time zone)
        (1, "pv", "2017-11-25 10:00:00"),
        (1, "buy", "2017-11-26 12:00:00"),
        (1, "pv", "2017-11-30 09:00:00"),  # back after 3 quiet days
        (2, "pv", "2017-11-27 23:59:50"),
        (2, "pv", "2017-11-28 00:00:10"),  # 20 s later, but the next day
        (3, "buy", "2017-11-29 08:00:00"),  # first seen on the last snapshot day
        (4, "pv", "2017-11-30 20:00:00"),  # first seen after the last snapshot day: no row
        (5, "pv", "2017-11-25 01:00:00"),
        (5, "cart", "2017-11-28 23:00:00"),  # exactly D+3 of the 25th
    ]
    events = spark.createDataFrame(
        [(u, 100 + i, 7, b, t) for i, (u, b, t) in enumerate(rows)],
        "user_id long, item_id long, category_id long, behavior string, local string",
    ).select("user_id", "item_id", "category_id", "behavior", F.to_timestamp("local").alias("ts"))
    days = jobs.snapshot_days(spark, date(2017, 11, 25), date(2017, 11, 29))
    labels = jobs.labels(events, days).collect()
    got = {(r.user_id, r.snapshot_day.day): (r.buy_next_1d, r.churn_3d) for r in labels}
    # the last day with events is 11-30: churn_3d is known for D <= 11-27, null (not False) after
    assert got == {
        (1, 25): (True, False),
        (1, 26): (False, True),
        (1, 27): (False, False),
        (1, 28): (False, None),
        (1, 29): (False, None),
        (2, 27): (False, False),
        (2, 28): (False, None),
        (2, 29): (False, None),
        (3, 29): (False, None),
        (5, 25): (False, False),
        (5, 26): (False, False),
        (5, 27): (False, False),
        (5, 28): (False, None),
        (5, 29): (False, None),
    }


def test_item_and_category_stats(built, raw):
    settings, _ = built
    items = _table(settings, "item_stats")
    top_item = raw.item_id.value_counts().index[0]
    day = date(2017, 12, 1)
    row = items[(items.item_id == top_item) & (items.snapshot_day.astype(str) == day.isoformat())].iloc[0]
    for w in WINDOWS:
        win = raw[(raw.item_id == top_item) & (raw.day <= day) & (raw.day > day - timedelta(days=w))]
        assert row[f"n_pv_{w}d"] == (win.behavior == "pv").sum()
        assert row[f"n_users_{w}d"] == win.user_id.nunique()
    assert row.category_id == raw.loc[raw.item_id == top_item, "category_id"].iloc[0]
    cats = _table(settings, "category_stats")
    top_cat = raw.category_id.value_counts().index[0]
    crow = cats[(cats.category_id == top_cat) & (cats.snapshot_day.astype(str) == day.isoformat())].iloc[0]
    win = raw[(raw.category_id == top_cat) & (raw.day <= day) & (raw.day > day - timedelta(days=7))]
    assert crow.n_buy_7d == (win.behavior == "buy").sum()
    assert crow.cvr_buy_pv_7d == pytest.approx(
        ((win.behavior == "buy").sum() + 1) / ((win.behavior == "pv").sum() + 45)
    )


def test_segments_and_profile(built):
    settings, result = built
    segments = _table(settings, "user_segment")
    profile = _table(settings, "segment_profile")
    last = segments[segments.snapshot_day.astype(str) == END.isoformat()]
    assert set(last.segment_id) == set(profile.segment_id)
    assert profile["size"].sum() == len(last)
    assert (
        last.segment_id.value_counts().sort_index().tolist()
        == profile.sort_values("segment_id")["size"].tolist()
    )
    assert -1.0 <= result.silhouette <= 1.0 and result.silhouette > 0.1
    # the portrait separates light and heavy users
    assert profile.mean_n_pv_7d.max() > 3 * profile.mean_n_pv_7d.min()


def test_build_result_counts_rows_and_quarantine(built):
    settings, result = built
    assert result.days == [(START + timedelta(days=i)).isoformat() for i in range(8)]
    assert result.events_rejected == {"out_of_window": 4} and result.events_read == 10_000
    for name in TABLES:
        assert result.rows[name] == len(_table(settings, name)) > 0


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.parquet"))
    }


def test_rerunning_a_day_is_byte_identical_and_leaves_other_days(
    spark, taobao_sample, tmp_path, make_settings
):
    settings = make_settings(tmp_path)
    out = tmp_path / "features"
    build_features(settings, taobao_sample, date(2017, 11, 30), date(2017, 12, 1))
    before = _digest(out)
    inodes = {p: p.stat().st_ino for p in out.rglob("snapshot_day=2017-11-30/*.parquet")}
    build_features(settings, taobao_sample, date(2017, 12, 1), date(2017, 12, 1))
    assert _digest(out) == before
    assert {
        p: p.stat().st_ino for p in out.rglob("snapshot_day=2017-11-30/*.parquet")
    } == inodes  # not rewritten

    def crash(step):
        if step.startswith("publishing"):
            raise RuntimeError("killed before publishing")

    with pytest.raises(RuntimeError):
        build_features(settings, taobao_sample, date(2017, 12, 1), date(2017, 12, 1), on_step=crash)
    assert _digest(out) == before
    assert not list(out.glob(".staging-*"))


def _files(table: Path) -> dict[str, str]:
    """sha256 of every file under a table folder, hidden ones included (a .crc, a _SUCCESS)."""
    return {
        str(p.relative_to(table)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(table.rglob("*"))
        if p.is_file()
    }


def test_builds_of_the_same_input_are_byte_identical(spark, taobao_sample, tmp_path, make_settings):
    """Two builds of the same input, into two folders and again into the first, give the same files.

    One JVM writes all three here, so the footer is also checked for what changes from one JVM to the
    next: parquet-mr lists each column's encodings in a HashSet's order (identity hashes), which is
    what made every file's sha256 differ between separate ``shopsight features build`` runs.
    """
    events = tmp_path / "events.csv"
    events.write_text("\n".join(taobao_sample.read_text().splitlines()[:1500]) + "\n")  # 24 users
    start, end = date(2017, 11, 29), date(2017, 12, 1)
    first, second = make_settings(tmp_path / "first"), make_settings(tmp_path / "second")
    build_features(first, events, start, end)
    build_features(second, events, start, end)
    tables = [first.data_dir.absolute() / "features" / name for name in (*TABLES, "segment_profile")]
    digests = {t.name: _files(t) for t in tables}
    days = {f"snapshot_day={start + timedelta(days=i)}/part-00000.parquet" for i in range(3)}
    for name in TABLES:
        assert set(digests[name]) == days, name  # one file per day, named by the day alone
    for name, digest in digests.items():
        assert _files(second.data_dir.absolute() / "features" / name) == digest, name
    build_features(first, events, start, end)  # rebuilt in place
    assert {t.name: _files(t) for t in tables} == digests

    for name, table in zip(TABLES, tables, strict=False):
        frame = pd.read_parquet(table)
        # the sort keys are a total order within a day: no tie is left for a shuffle to order
        assert not frame.duplicated(["snapshot_day", *KEYS[name]]).any(), name
        for path in table.rglob("*.parquet"):
            footer = pq.ParquetFile(path).metadata
            assert not footer.created_by.startswith("parquet-mr"), path
            assert not any(key.startswith(b"org.apache.spark") for key in footer.metadata or {}), path


def test_segments_do_not_depend_on_the_order_rows_arrive_in(spark, built):
    """KMeans seeds from rows sampled by partition and position, and sums in task order: a shuffle's
    order, which changes from run to run, must not change the segments, the profile or the score."""
    from pyspark.sql import functions as F

    from shopsight.features import jobs

    settings, _ = built
    activity = spark.read.parquet(str(settings.data_dir.absolute() / "features" / "user_activity")).cache()
    runs = []
    for partitions, seed in ((1, None), (3, 1), (5, 2)):
        shuffled = activity if seed is None else activity.orderBy(F.rand(seed)).repartition(partitions)
        segments, profile, silhouette = jobs.user_segments(shuffled, 6, WINDOWS)
        runs.append(
            (sorted(segments.select("user_id", "snapshot_day", "segment_id").collect()), profile, silhouette)
        )
    activity.unpersist()
    assert runs[1] == runs[0] and runs[2] == runs[0]


def test_a_build_removes_the_staging_of_killed_builds_only(spark, taobao_sample, tmp_path, make_settings):
    """A SIGKILLed build leaves its staging folder; the next build removes it, but not a running one's."""
    settings = make_settings(tmp_path)
    out = settings.data_dir.absolute() / "features"
    events = tmp_path / "slice.csv"
    events.write_text("\n".join(ONE_DAY) + "\n")
    env = {**os.environ, "SHOPSIGHT_DATA_DIR": str(tmp_path), "SHOPSIGHT_SPARK__MASTER": "local[1]"}
    command = [sys.executable, "-m", "shopsight", "features", "build", "--data", str(events)]
    killed = subprocess.Popen(
        [*command, "--start", "2017-11-26", "--end", "2017-11-26", "--out", str(out)],
        env=env,
        start_new_session=True,  # its own process group: the kill reaches a JVM it may have started
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(out.glob(".staging-*")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    (leftover,) = out.glob(".staging-*")
    legacy = out / ".staging-0badf00d"  # an earlier version's, which named no builder
    legacy.mkdir()
    running = feature_build._new_staging(out)  # named after this process, which is alive
    assert running.name.startswith(f".staging-{os.getpid()}-") and psutil.pid_exists(os.getpid())

    steps, tables = [], []
    build_features(
        settings,
        events,
        date(2017, 11, 26),
        date(2017, 11, 26),
        on_step=steps.append,
        on_table=lambda *table: tables.append(table),
    )
    # what the progress bar shows: every table as it starts, then all done
    assert [name for _, _, name in tables] == [*feature_build.KEYS, ""]
    assert [(done, total) for done, total, _ in tables] == [
        (i, len(feature_build.KEYS)) for i in range(len(feature_build.KEYS) + 1)
    ]
    assert steps[0].startswith("reading") and steps[-1] == "publishing partitions"

    assert not leftover.exists() and not legacy.exists()
    assert running.exists()
    assert sorted(out.glob(".staging-*")) == [running]


def test_bad_input_is_reported_clearly(spark, taobao_sample, tmp_path, make_settings):
    settings = make_settings(tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ShopsightError, match="empty"):
        build_features(settings, empty, START, END)
    with pytest.raises(ShopsightError, match="before --start"):
        build_features(settings, taobao_sample, END, START)

    # malformed rows are quarantined and counted; a day without any event still gets rows
    lines = taobao_sample.read_text().splitlines()
    kept = [line for line in lines if not (1511798400 <= int(line.split(",")[4]) < 1511884800)]  # drop 11-28
    bad = tmp_path / "mixed.csv"
    bad.write_text(
        "\n".join(kept[:4000] + ["1,2,3,pv", "x,2,3,pv,1511600000", "1,2,3,like,1511600000"]) + "\n"
    )
    result = build_features(settings, bad, date(2017, 11, 27), date(2017, 11, 29))
    assert result.events_rejected["wrong_field_count"] == 1
    assert result.events_rejected["non_numeric_id"] == 1 and result.events_rejected["unknown_behavior"] == 1
    assert result.quarantine.exists()
    # named per input, so that another folder's mixed.csv keeps its own rejects
    assert result.quarantine == quarantine_file(settings.data_dir.absolute() / "quarantine", bad)
    activity = pd.read_parquet(tmp_path / "features" / "user_activity")
    quiet = activity[activity.snapshot_day.astype(str) == "2017-11-28"]
    assert len(quiet) > 0 and (quiet.n_pv_1d == 0).all() and (quiet.active_days_1d == 0).all()
    reader = EventReader(bad, window=TimeWindow.from_settings(settings.data))
    assert result.events_read == sum(t.num_rows for t in reader) + sum(reader.report.rejected.values())


# One shop-local day of Taobao-shaped rows (2017-11-26, China time): the last day of its own data, so
# no label can be known, and a day on which most users have a single event, as in a real time slice.
ONE_DAY = [
    "1,2268318,2520377,pv,1511661005",
    "1,2333346,2520771,pv,1511661370",
    "1,2576651,149192,cart,1511663480",
    "100,1603476,2951233,pv,1511656702",
    "115,3886469,4526093,pv,1511682013",
    "117,2945933,2355072,buy,1511698432",
    "1000,4365585,2520377,fav,1511630004",
]


@pytest.mark.parametrize(
    "lines",
    [ONE_DAY, [line for line in ONE_DAY if line.startswith("1,")], ONE_DAY[:1]],
    ids=["one-day", "one-user", "one-event"],
)
def test_any_input_the_reader_accepts_builds_with_typed_empty_labels(spark, tmp_path, make_settings, lines):
    settings = make_settings(tmp_path)
    events = tmp_path / "slice.csv"
    events.write_text("\n".join(lines) + "\n")
    day = date(2017, 11, 26)

    result = build_features(settings, events, day, day)

    users = len({line.split(",")[0] for line in lines})
    assert result.days == ["2017-11-26"] and result.events_read == len(lines)
    assert result.rows["user_activity"] == result.rows["user_segment"] == users
    assert result.rows["labels"] == 0  # the day after is not observed: no label is known
    labels = _table(settings, "labels")  # empty, but readable and typed like any other day's
    assert labels.empty
    assert {"user_id", "buy_next_1d", "churn_3d", "snapshot_ts"} <= set(labels.columns)
    assert str(labels.user_id.dtype) == "int64" and str(labels.buy_next_1d.dtype) == "bool"
    assert sum(s["size"] for s in result.segment_profile) == users
    assert np.isnan(result.silhouette) if users < 3 else -1.0 <= result.silhouette <= 1.0
