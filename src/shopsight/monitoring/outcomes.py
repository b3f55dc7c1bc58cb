"""What followed each served answer: the prediction log joined with the events after it.

A task's :class:`~shopsight.training.tasks.FollowUp` says what to look for. The window of an answer
starts at the time its features describe (``as_of``: the request's time, or the replayed day's end) and
lasts the task's horizon. Each answer ends up in one of three states:

- ``labelled``: its window is over in the events, and ``outcome`` holds what happened (bought or not,
  churned or not, the next item touched);
- ``pending``: its window is not over yet in the events (``observed_until``): labelling it now would
  call every buyer of tomorrow a non-buyer;
- ``unseen``: the next-item task only, the user touched nothing in the window (no next item to rank).

An event after the window is late and does not count. The same request logged twice (a retry, or the
ingress resending a request whose replica died after logging it) counts once: answers are unique by
request id, user and alias.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from shopsight.platform import ShopsightError
from shopsight.training.tasks import FollowUp

LABELLED, PENDING, UNSEEN = "labelled", "pending", "unseen"
KEY = ["request_id", "user_id", "alias"]


def unique_answers(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per request, user and alias (the first logged)."""
    return predictions.sort_values("time", kind="stable").drop_duplicates(KEY).reset_index(drop=True)


def read_events(path: Path | str, start: datetime, end: datetime, users) -> pd.DataFrame:
    """Events of ``users`` in ``[start, end)``: user_id, item_id, behavior, ts (UTC), sorted by time.

    ``path``: a folder of event parquet (day-partitioned as the simulator and ``data`` write it, or not)
    or a simulation folder holding ``events/``.
    """
    path = Path(path)
    if (path / "events").is_dir():
        path = path / "events"
    if not path.exists():
        raise ShopsightError(f"no events at {path}: name the event folder with --events")
    dataset = ds.dataset(path, format="parquet", partitioning="hive", exclude_invalid_files=True)
    stamp = pa.timestamp("us", tz="UTC")
    condition = (
        (ds.field("ts") >= pa.scalar(start, stamp))
        & (ds.field("ts") < pa.scalar(end, stamp))
        & ds.field("user_id").isin(pa.array(np.asarray(users, dtype=np.int64)))
    )
    table = dataset.to_table(columns=["user_id", "item_id", "behavior", "ts"], filter=condition)
    return table.to_pandas().sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)


def observed_end(path: Path | str, timezone: str) -> datetime:
    """The end of what the events have observed: the end of a simulation's last day (its manifest lists
    its days), else the latest event's time (the next event, if any, comes after it)."""
    import json
    from zoneinfo import ZoneInfo

    path = Path(path)
    folder = path.parent if path.name == "events" else path
    manifest = folder / "manifest.json"
    if manifest.exists():
        last = max(json.loads(manifest.read_text())["days"])
        start = datetime.fromisoformat(last).replace(tzinfo=ZoneInfo(timezone))
        return (start + timedelta(days=1)).astimezone(UTC)
    if (path / "events").is_dir():
        path = path / "events"
    dataset = ds.dataset(path, format="parquet", partitioning="hive", exclude_invalid_files=True)
    latest = pc.max(dataset.to_table(columns=["ts"]).column("ts")).as_py()
    if latest is None:
        raise ShopsightError(f"no events at {path}")
    return latest


def label(
    answers: pd.DataFrame, events: pd.DataFrame, follow_up: FollowUp, observed_until: datetime
) -> pd.DataFrame:
    """``answers`` with ``status`` (labelled, pending, unseen) and ``outcome`` (a bool, or the next item
    for ``next_item``), from ``events`` (user_id, item_id, behavior, ts; all that may fall in the
    windows)."""
    out = answers.copy()
    horizon = pd.Timedelta(days=follow_up.horizon_days)
    starts = pd.to_datetime(out["as_of"], utc=True)
    ends = starts + horizon
    until = pd.Timestamp(observed_until).tz_convert("UTC") if pd.Timestamp(observed_until).tzinfo else (
        pd.Timestamp(observed_until, tz="UTC")
    )  # fmt: skip
    complete = (ends <= until).to_numpy()
    relevant = events
    if follow_up.kind == "happens" and follow_up.behaviors:
        relevant = events[events["behavior"].isin(follow_up.behaviors)]
    first_in_window = _first_event_in_window(out["user_id"].to_numpy(), starts, ends, relevant)
    status = np.where(complete, LABELLED, PENDING).astype(object)
    if follow_up.kind == "next_item":
        found = first_in_window >= 0
        items = relevant["item_id"].to_numpy()
        outcome = np.where(found, items[np.maximum(first_in_window, 0)], -1).astype(object)
        status[complete & ~found] = UNSEEN
        outcome[status != LABELLED] = None
    elif follow_up.kind in ("happens", "absent"):
        happened = first_in_window >= 0
        outcome = (happened if follow_up.kind == "happens" else ~happened).astype(object)
        outcome[~complete] = None
    else:
        raise ShopsightError(f"unknown follow-up kind {follow_up.kind!r}: next_item, happens or absent")
    out["status"] = status
    out["outcome"] = outcome
    return out


def _first_event_in_window(users: np.ndarray, starts, ends, events: pd.DataFrame) -> np.ndarray:
    """Per answer, the row of ``events`` (sorted by user, then time) of its user's first event in its
    window, or -1."""
    events = events.reset_index(drop=True)
    if events.empty:
        return np.full(len(users), -1)
    ev_users = events["user_id"].to_numpy()
    ev_ts = pd.to_datetime(events["ts"], utc=True).to_numpy()
    key_order = np.lexsort((ev_ts, ev_users))
    ev_users, ev_ts = ev_users[key_order], ev_ts[key_order]
    lo = np.searchsorted(ev_users, users, side="left")
    hi = np.searchsorted(ev_users, users, side="right")
    start_values, end_values = starts.to_numpy(), ends.to_numpy()
    found = np.full(len(users), -1)
    for row in range(len(users)):
        if hi[row] == lo[row]:
            continue
        times = ev_ts[lo[row] : hi[row]]
        first = lo[row] + np.searchsorted(times, start_values[row], side="left")
        if first < hi[row] and ev_ts[first] < end_values[row]:
            found[row] = key_order[first]
    return found


def window_bounds(answers: pd.DataFrame, follow_up: FollowUp) -> tuple[datetime, datetime]:
    """The span of events that can label ``answers``."""
    starts = pd.to_datetime(answers["as_of"], utc=True)
    return starts.min().to_pydatetime(), (
        starts.max() + timedelta(days=follow_up.horizon_days)
    ).to_pydatetime()
