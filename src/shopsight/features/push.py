"""Push fresh events to the online store: user sequences exactly, user activity incrementally.

The batch build recomputes everything each day; between builds, :func:`push_events` folds new events
into the online rows of ``user_sequence`` and ``user_activity`` through their push sources:

* the sequence gets the new events appended (oldest dropped beyond the configured length): exact;
* activity: behaviour counts of every window, sessions, active days, conversion rates, recency and the
  day-part shares are updated as if the new events fell inside every window; distinct items and
  categories grow by those not already in the sequence; top categories are kept. Windows only roll
  forward (old days drop out) at the next batch build, which replaces these rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from shopsight.data import EventReader, quarantine_file
from shopsight.data.schema import BEHAVIORS, USER_ID
from shopsight.features.definitions import SEQUENCE_FIELDS, user_activity_fields
from shopsight.features.jobs import CREATED_TS, DAY_PARTS, SNAPSHOT_TS
from shopsight.features.store import feature_store
from shopsight.platform import Settings, ShopsightError

_PART_OF_HOUR = np.array(["night"] * 6 + ["morning"] * 6 + ["afternoon"] * 6 + ["evening"] * 6)


@dataclass
class PushResult:
    users: int
    events: int
    rejected: dict[str, int]
    quarantine: Path | None


def push_events(settings: Settings, events_path: Path, format: str = "auto") -> PushResult:
    """Fold the events of a file into the online sequence and activity of their users."""
    reader = EventReader(
        events_path,
        format,  # type: ignore[arg-type]
        quarantine=quarantine_file(Path(settings.data_dir).absolute() / "quarantine", events_path),
    )
    events = reader.read_all().to_pandas()
    if events.empty:
        raise ShopsightError(
            f"{events_path}: no valid events to push ({reader.report.rows_rejected} rejected)"
        )
    events = events.sort_values([USER_ID, "ts", "item_id", "behavior"], kind="stable")
    store = feature_store(settings)
    users = sorted(events[USER_ID].unique().tolist())
    windows = settings.features.windows
    activity_names = [f.name for f in user_activity_fields(windows)]
    sequence_names = [f.name for f in SEQUENCE_FIELDS]
    current = store.get_online_features(
        features=[f"user_activity:{n}" for n in activity_names]
        + [f"user_sequence:{n}" for n in sequence_names],
        entity_rows=[{USER_ID: u} for u in users],
    ).to_dict(include_event_timestamps=True)

    seq_rows, act_rows = [], []
    tz = ZoneInfo(settings.data.timezone)
    for index, user in enumerate(users):
        new = events[events[USER_ID] == user]
        old = {name: current[name][index] for name in activity_names + sequence_names}
        old_ts = current.get("user_activity__n_pv_1d__ts", current.get("n_pv_1d__ts", [0] * len(users)))[
            index
        ]
        snapshot = max(new["ts"].max().to_pydatetime(), datetime.fromtimestamp(old_ts or 0, UTC))
        seq_rows.append(
            {
                USER_ID: user,
                SNAPSHOT_TS: snapshot,
                CREATED_TS: datetime.now(UTC),
                **_append_sequence(old, new, settings.features.sequence_length),
            }
        )
        act_rows.append(
            {
                USER_ID: user,
                SNAPSHOT_TS: snapshot,
                CREATED_TS: datetime.now(UTC),
                **_add_activity(
                    old, new, windows, snapshot, old_ts, tz, settings.features.session_gap_minutes
                ),
            }
        )

    from feast.data_source import PushMode

    store.push("user_sequence_push", pd.DataFrame(seq_rows), to=PushMode.ONLINE)
    store.push("user_activity_push", pd.DataFrame(act_rows), to=PushMode.ONLINE)
    return PushResult(len(users), len(events), dict(reader.report.rejected), reader.report.quarantine_path)


def _append_sequence(old: dict, new: pd.DataFrame, length: int) -> dict:
    def extend(name, values):
        return (list(old[name] or []) + list(values))[-length:]

    seq = {
        "seq_item_ids": extend("seq_item_ids", new["item_id"].tolist()),
        "seq_category_ids": extend("seq_category_ids", new["category_id"].tolist()),
        "seq_behaviors": extend("seq_behaviors", new["behavior"].tolist()),
        "seq_ts": extend("seq_ts", (new["ts"].astype("int64") // 1_000_000).tolist()),
    }
    seq["seq_length"] = len(seq["seq_item_ids"])
    return seq


def _add_activity(old: dict, new: pd.DataFrame, windows, snapshot: datetime, old_ts, tz, gap_minutes) -> dict:
    row = {k: v for k, v in old.items() if not k.startswith("seq_")}
    seconds = new["ts"].astype("int64").to_numpy() // 1_000_000
    previous = (old.get("seq_ts") or [None])[-1]
    gaps = np.diff(np.concatenate([[previous if previous is not None else -(10**12)], seconds]))
    new_sessions = int((gaps > gap_minutes * 60).sum())
    seen_items, seen_cats = set(old.get("seq_item_ids") or []), set(old.get("seq_category_ids") or [])
    new_items = len(set(new["item_id"]) - seen_items)
    new_cats = len(set(new["category_id"]) - seen_cats)
    last_day = datetime.fromtimestamp(previous, tz).date() if previous is not None else None
    new_days = len({d for d in new["ts"].dt.tz_convert(tz).dt.date if d != last_day})
    counts = new["behavior"].value_counts()
    for w in windows:
        events_before = sum(int(row.get(f"n_{b}_{w}d") or 0) for b in BEHAVIORS)
        for b in BEHAVIORS:
            row[f"n_{b}_{w}d"] = int(row.get(f"n_{b}_{w}d") or 0) + int(counts.get(b, 0))
        row[f"n_items_{w}d"] = int(row.get(f"n_items_{w}d") or 0) + new_items
        row[f"n_categories_{w}d"] = int(row.get(f"n_categories_{w}d") or 0) + new_cats
        row[f"active_days_{w}d"] = min(w, int(row.get(f"active_days_{w}d") or 0) + new_days)
        sessions = int(row.get(f"n_sessions_{w}d") or 0) + new_sessions
        row[f"n_sessions_{w}d"] = sessions
        row[f"mean_session_events_{w}d"] = (events_before + len(new)) / sessions if sessions else 0.0
        row[f"cvr_buy_pv_{w}d"] = (row[f"n_buy_{w}d"] + 1.0) / (row[f"n_pv_{w}d"] + 45.0)
        row[f"cvr_buy_cart_{w}d"] = (row[f"n_buy_{w}d"] + 1.1) / (row[f"n_cart_{w}d"] + 3.0)
    widest = max(windows)
    total_before = sum(int(old.get(f"n_{b}_{widest}d") or 0) for b in BEHAVIORS)
    parts = pd.Series(_PART_OF_HOUR[new["ts"].dt.tz_convert(tz).dt.hour.to_numpy()]).value_counts()
    total = total_before + len(new)
    for p in DAY_PARTS:
        row[f"share_{p}"] = ((row.get(f"share_{p}") or 0.0) * total_before + int(parts.get(p, 0))) / total
    elapsed_hours = (snapshot.timestamp() - (old_ts or snapshot.timestamp())) / 3600
    for b in BEHAVIORS:
        mine = seconds[(new["behavior"] == b).to_numpy()]
        if len(mine):
            row[f"hours_since_{b}"] = (snapshot.timestamp() - mine.max()) / 3600
        elif row.get(f"hours_since_{b}") is not None:
            row[f"hours_since_{b}"] = row[f"hours_since_{b}"] + elapsed_hours
    carts = set(new.loc[new["behavior"] == "cart", "item_id"]) - set(
        new.loc[new["behavior"] == "buy", "item_id"]
    )
    bought = int((new["behavior"] == "buy").sum())
    row["n_carted_not_bought"] = max(0, int(row.get("n_carted_not_bought") or 0) + len(carts) - bought)
    row["top_categories"] = list(row.get("top_categories") or [])
    row["top_category_share"] = row.get("top_category_share") or 0.0
    return row
