"""Streaming summary statistics of events: counts, mix, activity, time range."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shopsight.data.schema import BEHAVIORS, CATEGORY_ID, ITEM_ID, TS, USER_ID


@dataclass
class EventStats:
    """Accumulates statistics over event tables, one batch at a time (memory: one entry per user/item)."""

    events: int = 0
    behavior_counts: Counter = field(default_factory=Counter)
    events_per_user: Counter = field(default_factory=Counter)
    buyers: set = field(default_factory=set)
    items: set = field(default_factory=set)
    categories: set = field(default_factory=set)
    first_ts: object = None
    last_ts: object = None

    def update(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.events += table.num_rows
        behavior = table.column("behavior").to_numpy(zero_copy_only=False)
        kinds, counts = np.unique(behavior, return_counts=True)
        self.behavior_counts.update(dict(zip(kinds.tolist(), counts.tolist(), strict=True)))
        users = table.column(USER_ID).to_numpy()
        ids, counts = np.unique(users, return_counts=True)
        self.events_per_user.update(dict(zip(ids.tolist(), counts.tolist(), strict=True)))
        self.buyers.update(np.unique(users[behavior == "buy"]).tolist())
        self.items.update(np.unique(table.column(ITEM_ID).to_numpy()).tolist())
        self.categories.update(np.unique(table.column(CATEGORY_ID).to_numpy()).tolist())
        lo, hi = pc.min_max(table.column(TS)).values()
        self.first_ts = lo.as_py() if self.first_ts is None else min(self.first_ts, lo.as_py())
        self.last_ts = hi.as_py() if self.last_ts is None else max(self.last_ts, hi.as_py())

    @property
    def users(self) -> int:
        return len(self.events_per_user)

    @property
    def behavior_mix(self) -> dict[str, float]:
        """Percent of events per behaviour."""
        return {b: 100.0 * self.behavior_counts.get(b, 0) / max(self.events, 1) for b in BEHAVIORS}

    @property
    def buyer_share(self) -> float:
        """Share of users with at least one purchase."""
        return len(self.buyers) / max(self.users, 1)

    def events_per_user_quantiles(self, qs=(0.5, 0.9, 0.99)) -> dict[float, float]:
        if not self.events_per_user:
            return {q: 0.0 for q in qs}
        counts = np.fromiter(self.events_per_user.values(), dtype=np.int64)
        return {q: float(np.quantile(counts, q)) for q in qs}
