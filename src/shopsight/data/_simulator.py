"""A behaviour simulator calibrated on the Taobao UserBehavior dataset.

The world:
  * items grouped into categories of uneven (Zipf-like) size; within a category, item popularity
    is Zipf-like, and each item has "related" items (its next few neighbours in the category, like
    the next model of a series), so within-session sequences carry signal beyond popularity;
  * each user has an activity level (expected sessions a day over the long run, log-normal:
    heavy-tailed), a few preferred categories, a latent buyer propensity, and a lapse probability
    (logit-normal: some users drift away far more easily than others).

Dormancy: on each day a user is active or dormant, a hidden two-state Markov chain. An active user
goes dormant the next day with their lapse probability, a dormant one comes back with
``p_return``; the chain starts in its stationary law. A dormant day has ``dormant_activity`` times
the sessions of an active one, and the active rate is raised so that the long-run mean stays the
user's activity level (the event volume does not move; the purchases lost with the quiet days are
made up by ``intent_bias``). Churn therefore shows in the events: activity fades, then days pass
without any, and quiet days announce more of them (a memoryless Poisson user would not).

A day of a user:
  * sessions ~ Poisson(active rate x weekday factor x (1 if active else dormant_activity)), each
    starting at an hour drawn from Taobao's daily rhythm (evening peak), views following a random
    walk over related items; a view is carted or favourited with small probabilities;
  * at the start of the day the user forms a purchase intent with probability
    q = sigmoid(a + b * propensity + c * log1p(open carts and favourites) + d * log(activity)):
    the purchase funnel. With an intent and at least one session, the user buys 1 + Poisson items,
    mostly from what is in the cart or favourites, otherwise something viewed that day.

Because the intent and tomorrow's hidden state depend only on the state at the end of the previous
day, the simulator knows the exact probability that a user buys tomorrow given everything up to
tonight, the hidden state included: ``P(buy on d+1) = P(at least one session on d+1 | state on d) *
q(d+1)``. Likewise the probability of no event at all on d+1 .. d+3 (churn), by propagating the
chain over the three days. Both are written beside the events (``truth/next_day_buy``,
``truth/churn_3d``) so that models can be compared with the oracle.

Users are simulated in blocks of :data:`USERS_PER_BLOCK`, each block from its own seed derived from
the run's seed, and written out as they go: memory stays bounded by the block and the writer's buffer,
and the output for a seed does not depend on how the run is chunked.

Going on: a simulation saves where each block stands at the end of its last day (random generator,
hidden states of the last days, open carts and favourites) under ``state/``, and
:func:`continue_simulation` adds days from there for the same users and items, so that what happens
after a day on which models made predictions can be observed, and depends on what came before. A
continuation may shift behavioural constants on its own days (:data:`SHIFTABLE`): drift, injected.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time as _time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shopsight.data._writer import DayPartitionedWriter, check_replaceable, publish_dir, staging_dir_for
from shopsight.data.schema import BEHAVIORS, EVENT_SCHEMA, SHOP_TIMEZONE
from shopsight.platform import ShopsightError

USERS_PER_BLOCK = 500
MANIFEST = "manifest.json"
STATE = "state"  # one file per block of users: where it stands at the end of the last simulated day
GENERATOR = "shopsight.data.simulator"
CHURN_DAYS = 3  # the churn oracle's horizon: no event on D+1 .. D+CHURN_DAYS
_PV, _CART, _FAV, _BUY = range(4)

# Share of Taobao events by local hour, 0..23 (evening peak at 21h, trough at 4h).
_HOURLY_RHYTHM = np.array(
    [3.4, 1.9, 1.1, 0.7, 0.6, 0.7, 1.2, 2.1, 2.9, 3.5, 4.0, 4.1,
     4.2, 4.4, 4.4, 4.5, 4.4, 4.1, 4.3, 5.4, 6.7, 7.4, 7.1, 5.5]
)  # fmt: skip


# Activity profiles: named sets of the activity constants below. "taobao" is Taobao's own spread (median
# 62 events a user over the 9 days of the public sample); "heavy" is a shop's best customers, several
# sessions every day and rarely dormant (a median of about 320 events over 9 days): the long histories that
# next-item models must also rank well.
ACTIVITY_PROFILES: dict[str, dict[str, float]] = {
    "taobao": {},
    "heavy": {"median_sessions_per_day": 3.0, "activity_sigma": 0.4, "mean_session_views": 10.0,
              "lapse_median": 0.002, "p_return": 0.5},
}  # fmt: skip


@dataclass(frozen=True)
class SimulatorConfig:
    """What to simulate. The behavioural constants are calibrated to Taobao's marginals."""

    users: int = 2000
    days: int = 9
    seed: int = 0
    start: date = date(2017, 11, 25)
    timezone: str = SHOP_TIMEZONE
    items: int | None = None  # default: 4 per user (Taobao: 4.2M items for 988k users), at least 1000
    categories: int | None = None  # default: one per 100 items, at least 20

    # activity: expected sessions a day ~ LogNormal(log(median), sigma)
    median_sessions_per_day: float = 0.74
    activity_sigma: float = 1.0
    mean_session_views: float = 7.0
    max_session_views: int = 200
    weekend_factor: float = 1.12
    # dormancy: a hidden active/dormant state per user and day (a Markov chain)
    lapse_median: float = 0.03  # daily probability that an active user goes dormant, median user
    lapse_sigma: float = 1.0  # spread of the users' lapse probabilities (logit scale)
    p_return: float = 0.15  # daily probability that a dormant user comes back (spells of ~7 days)
    dormant_activity: float = 0.05  # sessions of a dormant day relative to an active one
    # browsing
    p_related: float = 0.50  # next view: a related item of the current one
    p_repeat: float = 0.10  # the same item again
    p_same_category: float = 0.22  # a popular item of the same category
    p_preferred_category: float = 0.85  # a new category is one of the user's own
    preferred_categories: int = 4
    zipf_exponent: float = 1.1
    # funnel
    p_cart: float = 0.058
    p_fav: float = 0.0325
    intent_bias: float = -1.35  # with dormancy's quiet days, Taobao's 2% of purchases
    intent_propensity: float = 0.7
    intent_open_items: float = 0.55
    intent_activity: float = 0.10
    extra_buys_mean: float = 0.15
    p_buy_from_open: float = 0.6
    p_cart_before_buy: float = 0.3
    open_item_days: int = 7

    def __post_init__(self) -> None:
        if self.users < 1 or self.days < 1:
            raise ValueError("users and days must be at least 1")
        if not (0 < self.lapse_median < 1 and 0 < self.p_return <= 1 and 0 <= self.dormant_activity <= 1):
            raise ValueError("lapse_median must be in (0, 1), p_return in (0, 1], dormant_activity in [0, 1]")

    @property
    def n_items(self) -> int:
        return self.items or max(1000, 4 * self.users)

    @property
    def n_categories(self) -> int:
        return self.categories or max(20, self.n_items // 100)


@dataclass
class SimulationResult:
    """What a simulation wrote."""

    out: Path
    events: int
    users: int
    days: list[str]
    behavior_counts: dict[str, int]
    files: int
    seconds: float
    config: dict = field(default_factory=dict)

    @property
    def behavior_mix(self) -> dict[str, float]:
        """Percent of events per behaviour."""
        return {b: 100.0 * self.behavior_counts.get(b, 0) / max(self.events, 1) for b in BEHAVIORS}


class _World:
    """Items, categories and their relations: shared by all users, drawn from the run's seed."""

    def __init__(self, cfg: SimulatorConfig) -> None:
        rng = np.random.default_rng([cfg.seed, 0xC0FFEE])
        n_items, n_cats = cfg.n_items, min(cfg.n_categories, cfg.n_items)
        # Uneven category sizes: Zipf-like weights, every category at least one item.
        weights = (np.arange(1, n_cats + 1) ** -0.9) * rng.lognormal(0, 0.3, n_cats)
        sizes = np.maximum(1, np.floor(weights / weights.sum() * (n_items - n_cats)).astype(np.int64) + 1)
        sizes[0] += n_items - sizes.sum()
        self.cat_size = sizes
        self.cat_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        # Category popularity follows size, with some categories hotter than their size.
        popularity = sizes * rng.lognormal(0, 0.5, n_cats)
        self.cat_cdf = np.cumsum(popularity) / popularity.sum()
        self.item_cat = np.repeat(np.arange(n_cats), sizes)
        self.item_pos = np.arange(n_items) - self.cat_offset[self.item_cat]
        # Public ids look like Taobao's: large, unordered.
        self.item_ids = rng.permutation(np.arange(1, n_items + 1)) * 7 + 1_000
        self.cat_ids = rng.permutation(np.arange(1, n_cats + 1)) * 131 + 10_000
        self.zipf = cfg.zipf_exponent

    def sample_categories(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.searchsorted(self.cat_cdf, rng.random(n), side="right").clip(max=len(self.cat_size) - 1)

    def popular_item_in(self, rng: np.random.Generator, cats: np.ndarray) -> np.ndarray:
        """An item of each category, Zipf-distributed by rank (inverse CDF of the continuous law)."""
        size = self.cat_size[cats].astype(np.float64)
        a = 1.0 - self.zipf
        rank = np.floor((1.0 + rng.random(len(cats)) * ((size + 1.0) ** a - 1.0)) ** (1.0 / a))
        rank = np.clip(rank, 1, size).astype(np.int64)
        return self.cat_offset[cats] + rank - 1

    def related_item(self, rng: np.random.Generator, items: np.ndarray) -> np.ndarray:
        """A related item: mostly the next ones in the category's series, sometimes the previous."""
        step = rng.choice(np.array([1, 2, 3, -1]), size=len(items), p=[0.5, 0.2, 0.1, 0.2])
        cats = self.item_cat[items]
        pos = (self.item_pos[items] + step) % self.cat_size[cats]
        return self.cat_offset[cats] + pos


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class _BlockState:
    """What a block's day loop carries from one day into the next: enough to go on as if it never stopped.

    The hidden state of the last :data:`CHURN_DAYS` days is kept (not only the last day's) because the churn
    oracle of those days is only written once their three next days are simulated.
    """

    first_day: int  # the day of dormant[:, 0]
    dormant: np.ndarray  # (users, up to CHURN_DAYS): True where dormant, the last column the last day
    open_user: np.ndarray  # carted or favourited, not bought yet: user index in the block ...
    open_item: np.ndarray  # ... item index ...
    open_day: np.ndarray  # ... and the day it went in
    rng: dict  # the block's bit generator state after its last draw

    @property
    def last_day(self) -> int:
        return self.first_day + self.dormant.shape[1] - 1

    def save(self, path: Path, block: _Block) -> None:
        # The users' drawn parameters go along, so that a re-created block can be checked against them.
        np.savez(
            path,
            first_day=np.int64(self.first_day),
            dormant=self.dormant,
            open_user=self.open_user,
            open_item=self.open_item,
            open_day=self.open_day,
            rng=np.array(json.dumps(self.rng)),
            user_ids=block.user_ids,
            activity=block.activity,
        )

    @classmethod
    def load(cls, path: Path, block: _Block) -> _BlockState:
        with np.load(path) as saved:
            if not (
                np.array_equal(saved["user_ids"], block.user_ids)
                and np.array_equal(saved["activity"], block.activity)
            ):
                raise ShopsightError(
                    f"{path}: its users are not the ones the simulator draws from the seed today "
                    "(the simulator changed since); simulate it again"
                )
            return cls(
                first_day=int(saved["first_day"]),
                dormant=saved["dormant"],
                open_user=saved["open_user"],
                open_item=saved["open_item"],
                open_day=saved["open_day"],
                rng=json.loads(str(saved["rng"])),
            )


@dataclass
class _BlockDays:
    """What a block wrote over some days, and where it stands after them."""

    events: pa.Table
    truth: pa.Table  # next-day purchase oracle of the snapshot days whose next day is now simulated
    churn: pa.Table  # churn oracle of the snapshot days whose CHURN_DAYS next days are now all simulated
    state: _BlockState


class _Block:
    """One block of users, simulated day after day.

    Users' parameters are drawn in the constructor, so re-creating a block from the same config gives the
    same users. Constants that act per day are read through :meth:`cfg_on`, so that a continuation can
    shift them on its own days (``day_cfg``) while the users stay those of ``cfg``.
    """

    def __init__(
        self, cfg: SimulatorConfig, world: _World, first_user: int, n_users: int, block: int
    ) -> None:
        self.cfg, self.world = cfg, world
        self.day_cfg: dict[int, SimulatorConfig] = {}  # days whose constants differ from cfg's
        self.rng = np.random.default_rng([cfg.seed, 1, block])
        self.user_ids = np.arange(first_user, first_user + n_users, dtype=np.int64) + 1
        rng, n = self.rng, n_users
        self.activity = cfg.median_sessions_per_day * rng.lognormal(0.0, cfg.activity_sigma, n)
        self.propensity = rng.standard_normal(n)
        self.pref_cats = world.sample_categories(rng, n * cfg.preferred_categories).reshape(n, -1)
        self.pref_cdf = np.cumsum(rng.dirichlet(np.full(cfg.preferred_categories, 0.7), n), axis=1)
        logit = np.log(cfg.lapse_median / (1.0 - cfg.lapse_median))
        self.lapse = _sigmoid(logit + cfg.lapse_sigma * rng.standard_normal(n))
        # The chain's stationary share of active days; the active rate keeps the long-run mean at `activity`.
        self.p_active = cfg.p_return / (cfg.p_return + self.lapse)
        self.active_rate = self.activity / (self.p_active + (1.0 - self.p_active) * cfg.dormant_activity)

        tz = ZoneInfo(cfg.timezone)
        self.day_start = np.array(
            [int(datetime.combine(cfg.start + timedelta(days=d), datetime.min.time(), tz).timestamp())
             for d in range(cfg.days + 1)], dtype=np.int64,
        )  # fmt: skip
        self.weekend = np.array([(cfg.start + timedelta(days=d)).weekday() >= 5 for d in range(cfg.days + 1)])

    def cfg_on(self, day: int) -> SimulatorConfig:
        """The constants that act on ``day``."""
        return self.day_cfg.get(day, self.cfg)

    def _day_factor(self, day: int) -> float:
        return self.cfg_on(day).weekend_factor if self.weekend[day] else 1.0

    # -- dormancy -------------------------------------------------------------------------------

    def dormancy(self, first: int, n_days: int, last_dormant: np.ndarray | None) -> np.ndarray:
        """The hidden state of each user on days ``first`` .. ``first + n_days - 1``: True where dormant,
        shape (users, n_days). Day ``first`` follows ``last_dormant`` (the day before) through the chain, or
        without it starts in the chain's stationary law."""
        rng, n = self.rng, len(self.user_ids)
        dormant = np.empty((n, n_days), dtype=bool)
        for i, day in enumerate(range(first, first + n_days)):
            before = dormant[:, i - 1] if i else last_dormant
            if before is None:
                dormant[:, i] = rng.random(n) >= self.p_active
            else:
                dormant[:, i] = rng.random(n) < self._p_dormant_next(before, day)
        return dormant

    def _p_dormant_next(self, dormant: np.ndarray, day: int) -> np.ndarray:
        """P(dormant on ``day``) given the hidden state on the day before."""
        return np.where(dormant, 1.0 - self.cfg_on(day).p_return, self.lapse)

    def _p_no_session(self, day: int) -> tuple[np.ndarray, np.ndarray]:
        """P(no session on ``day``) of each user if active, and if dormant."""
        rate = self.active_rate * self._day_factor(day)
        return np.exp(-rate), np.exp(-rate * self.cfg_on(day).dormant_activity)

    def p_session(self, dormant: np.ndarray, day: int) -> np.ndarray:
        """P(at least one session on ``day``) given the hidden state on the day before."""
        p_dormant = self._p_dormant_next(dormant, day)
        quiet_active, quiet_dormant = self._p_no_session(day)
        return 1.0 - (1.0 - p_dormant) * quiet_active - p_dormant * quiet_dormant

    def p_no_event(self, dormant: np.ndarray, day: int, horizon: int) -> np.ndarray:
        """P(no session on ``day + 1`` .. ``day + horizon``) given the hidden state on ``day``.

        Forward recursion over the chain: ``active`` (``asleep``) = P(active (dormant) on the current day
        and no session since ``day``).
        """
        active, asleep = (~dormant).astype(np.float64), dormant.astype(np.float64)
        for d in range(day + 1, day + horizon + 1):
            quiet_active, quiet_dormant = self._p_no_session(d)
            p_return = self.cfg_on(d).p_return
            active, asleep = (
                (active * (1.0 - self.lapse) + asleep * p_return) * quiet_active,
                (active * self.lapse + asleep * (1.0 - p_return)) * quiet_dormant,
            )
        return active + asleep

    # -- browsing -------------------------------------------------------------------------------

    def _new_category(self, users: np.ndarray, cfg: SimulatorConfig) -> np.ndarray:
        rng = self.rng
        pick = (self.pref_cdf[users] < rng.random(len(users))[:, None]).sum(axis=1)
        own = self.pref_cats[users, np.minimum(pick, self.cfg.preferred_categories - 1)]
        other = self.world.sample_categories(rng, len(users))
        return np.where(rng.random(len(users)) < cfg.p_preferred_category, own, other)

    def browse(self, sessions: np.ndarray, first: int, cfg: SimulatorConfig) -> dict[str, np.ndarray]:
        """All views of all sessions (``sessions[u, i]``: sessions of user ``u`` on day ``first + i``): user
        index, day, item index, unix seconds, cart/fav flags."""
        rng, world = self.rng, self.world
        users, columns = np.nonzero(sessions)
        counts = sessions[users, columns]
        s_user, s_day = np.repeat(users, counts), np.repeat(columns + first, counts)
        n_sessions = len(s_user)
        lengths = np.minimum(rng.geometric(1.0 / cfg.mean_session_views, n_sessions), cfg.max_session_views)
        max_len = int(lengths.max()) if n_sessions else 0

        items = np.full((n_sessions, max_len), -1, dtype=np.int64)
        current = world.popular_item_in(rng, self._new_category(s_user, cfg))
        items[:, 0] = current
        for t in range(1, max_len):
            alive = np.flatnonzero(lengths > t)
            cur = current[alive]
            u = rng.random(len(alive))
            nxt = cur.copy()
            related = u < cfg.p_related
            nxt[related] = world.related_item(rng, cur[related])
            # repeats keep `cur`
            same_cat = (u >= cfg.p_related + cfg.p_repeat) & (
                u < cfg.p_related + cfg.p_repeat + cfg.p_same_category
            )
            nxt[same_cat] = world.popular_item_in(rng, world.item_cat[cur[same_cat]])
            jump = u >= cfg.p_related + cfg.p_repeat + cfg.p_same_category
            nxt[jump] = world.popular_item_in(rng, self._new_category(s_user[alive][jump], cfg))
            current[alive] = nxt
            items[alive, t] = nxt

        # Times: a session starts at an hour of the daily rhythm; views follow at ~40 s gaps.
        gaps = np.where(items >= 0, 3 + rng.exponential(40.0, items.shape), 0).astype(np.int64)
        gaps[:, 0] = 0
        offsets = np.cumsum(gaps, axis=1)
        hour_cdf = np.cumsum(_HOURLY_RHYTHM) / _HOURLY_RHYTHM.sum()
        hour = np.searchsorted(hour_cdf, rng.random(n_sessions), side="right").clip(max=23)
        start = hour * 3600 + rng.integers(0, 3600, n_sessions)
        # A session ends before midnight, so a day's sessions stay in that day.
        start = np.minimum(start, 86_399 - offsets[np.arange(n_sessions), lengths - 1])
        ts = self.day_start[s_day][:, None] + np.maximum(start, 0)[:, None] + offsets

        mask = items >= 0
        n_views = int(mask.sum())
        return {
            "user": np.broadcast_to(s_user[:, None], items.shape)[mask],
            "day": np.broadcast_to(s_day[:, None], items.shape)[mask],
            "item": items[mask],
            "ts": ts[mask],
            "cart": rng.random(n_views) < cfg.p_cart,
            "fav": rng.random(n_views) < cfg.p_fav,
        }

    # -- days -----------------------------------------------------------------------------------

    def run(self) -> _BlockDays:
        """Simulate the block's days from the start."""
        return self.simulate_days(0, self.cfg.days, None)

    def simulate_days(self, first: int, n_days: int, state: _BlockState | None) -> _BlockDays:
        """Simulate days ``first`` .. ``first + n_days - 1``, going on from ``state`` (the end of day
        ``first - 1``), or from the start (stationary dormancy, nothing in carts) without one.

        The days of one call share their constants. Draws are made in bulk over the call's days (the hidden
        states of all of them, then their sessions, their views, then the funnel day by day), so one call of
        two days is not the same draw as two calls of one day, though it is the same law.
        """
        cfg = self.cfg_on(first)
        if any(self.cfg_on(day) != cfg for day in range(first, first + n_days)):
            raise ValueError("the days simulated in one call must share their constants")
        rng, n = self.rng, len(self.user_ids)
        last_dormant = state.dormant[:, -1] if state is not None else None
        dormant = self.dormancy(first, n_days, last_dormant)
        scale = np.where(dormant, cfg.dormant_activity, 1.0)
        factor = np.array([self._day_factor(day) for day in range(first, first + n_days)])
        expected = self.active_rate[:, None] * factor[None, :] * scale  # (users, days)
        sessions = rng.poisson(expected)
        views = self.browse(sessions, first, cfg)

        ev_user = [views["user"]]
        ev_item = [views["item"]]
        ev_kind = [np.full(len(views["item"]), _PV, dtype=np.int8)]
        ev_ts = [views["ts"]]
        for flag, kind in (("cart", _CART), ("fav", _FAV)):
            sel = views[flag]
            ev_user.append(views["user"][sel])
            ev_item.append(views["item"][sel])
            ev_kind.append(np.full(int(sel.sum()), kind, dtype=np.int8))
            day_end = self.day_start[views["day"][sel] + 1] - 1
            ev_ts.append(np.minimum(views["ts"][sel] + rng.integers(2, 20, int(sel.sum())), day_end))

        # Views of each (user, day), grouped, to anchor purchases in that day's browsing.
        order = np.lexsort((views["ts"], views["user"], views["day"]))
        key = views["day"][order] * n + views["user"][order]

        if state is None:  # carted / favourited, not bought yet
            open_user = np.empty(0, dtype=np.int64)
            open_item = np.empty(0, dtype=np.int64)
            open_day = np.empty(0, dtype=np.int64)
        else:
            open_user, open_item, open_day = state.open_user, state.open_item, state.open_day
        truth_day, truth_p, truth_bought = [], [], []
        for i, d in enumerate(range(first, first + n_days)):
            open_count = np.bincount(open_user, minlength=n)
            q = _sigmoid(
                cfg.intent_bias
                + cfg.intent_propensity * self.propensity
                + cfg.intent_open_items * np.log1p(open_count)
                + cfg.intent_activity * np.log(self.activity)
            )
            buyers = np.flatnonzero((rng.random(n) < q) & (sessions[:, i] > 0))
            before = dormant[:, i - 1] if i else last_dormant
            if before is not None:  # the oracle for "buys on day d", known at the end of day d-1
                truth_day.append(d - 1)
                truth_p.append(self.p_session(before, d) * q)
                bought = np.zeros(n, dtype=bool)
                bought[buyers] = True
                truth_bought.append(bought)
            n_buys = 1 + rng.poisson(cfg.extra_buys_mean, len(buyers))
            b_user = np.repeat(buyers, n_buys)

            # Anchor: a random view of that user today; the purchase follows it.
            lo = np.searchsorted(key, d * n + b_user, side="left")
            hi = np.searchsorted(key, d * n + b_user, side="right")
            anchor = order[lo + (rng.random(len(b_user)) * (hi - lo)).astype(np.int64)]
            # The day boundary is hard: a purchase anchored late at night stays on its day.
            b_ts = np.minimum(
                views["ts"][anchor] + rng.integers(10, 120, len(b_user)), self.day_start[d + 1] - 1
            )
            b_item = views["item"][anchor].copy()

            # Most purchases come from the cart or favourites, when there is something there.
            o_order = np.argsort(open_user, kind="stable")
            o_lo = np.searchsorted(open_user[o_order], b_user, side="left")
            o_hi = np.searchsorted(open_user[o_order], b_user, side="right")
            from_open = (o_hi > o_lo) & (rng.random(len(b_user)) < cfg.p_buy_from_open)
            pick = o_lo + (rng.random(len(b_user)) * (o_hi - o_lo)).astype(np.int64)
            b_item[from_open] = open_item[o_order[pick[from_open]]]
            # Buying from the cart means opening the item's page first.
            ev_user.append(b_user[from_open])
            ev_item.append(b_item[from_open])
            ev_kind.append(np.full(int(from_open.sum()), _PV, dtype=np.int8))
            ev_ts.append(b_ts[from_open] - 8)
            # An impulse buy is sometimes carted right before it is bought.
            carted = ~from_open & (rng.random(len(b_user)) < cfg.p_cart_before_buy)
            ev_user.append(b_user[carted])
            ev_item.append(b_item[carted])
            ev_kind.append(np.full(int(carted.sum()), _CART, dtype=np.int8))
            ev_ts.append(b_ts[carted] - 4)
            ev_user.append(b_user)
            ev_item.append(b_item)
            ev_kind.append(np.full(len(b_user), _BUY, dtype=np.int8))
            ev_ts.append(b_ts)

            # Update the open set: today's carts and favourites in, bought and stale items out.
            today = (views["day"] == d) & (views["cart"] | views["fav"])
            open_user = np.concatenate([open_user, views["user"][today]])
            open_item = np.concatenate([open_item, views["item"][today]])
            open_day = np.concatenate([open_day, np.full(int(today.sum()), d)])
            bought_key = set((b_user * cfg.n_items + b_item).tolist())
            keep = ~np.isin(open_user * cfg.n_items + open_item, list(bought_key)) & (
                open_day > d - cfg.open_item_days
            )
            open_user, open_item, open_day = open_user[keep], open_item[keep], open_day[keep]

        user = np.concatenate(ev_user)
        item = np.concatenate(ev_item)
        ts = np.concatenate(ev_ts)
        events = pa.table(
            [
                pa.array(self.user_ids[user]),
                pa.array(self.world.item_ids[item]),
                pa.array(self.world.cat_ids[self.world.item_cat[item]]),
                pa.array(np.array(BEHAVIORS, dtype=object)[np.concatenate(ev_kind)], pa.string()),
                pa.array(ts.astype("datetime64[s]").astype("datetime64[us]")).cast(
                    pa.timestamp("us", tz="UTC")
                ),
            ],
            schema=EVENT_SCHEMA,
        )
        # The hidden states known so far, the saved days first: the churn oracle of a day needs its state.
        if state is None:
            window, window_first = dormant, first
        else:
            window, window_first = np.concatenate([state.dormant, dormant], axis=1), state.first_day
        churn = self._churn_truth(window, window_first, range(max(window_first, first - CHURN_DAYS),
                                                              first + n_days - CHURN_DAYS))  # fmt: skip
        kept = window[:, -CHURN_DAYS:]
        after = _BlockState(
            first_day=window_first + window.shape[1] - kept.shape[1],
            dormant=kept.copy(),
            open_user=open_user,
            open_item=open_item,
            open_day=open_day,
            rng=self.rng.bit_generator.state,
        )
        return _BlockDays(events, self._truth(truth_day, truth_p, truth_bought), churn, after)

    def _day_names(self, days) -> np.ndarray:
        return np.array([(self.cfg.start + timedelta(days=int(d))).isoformat() for d in days])

    def _truth(self, days: list[int], probs: list[np.ndarray], bought: list[np.ndarray]) -> pa.Table:
        if not days:
            return _TRUTH_SCHEMA.empty_table()
        n = len(self.user_ids)
        return pa.table(
            [
                pa.array(np.tile(self.user_ids, len(days))),
                pa.array(np.repeat(self._day_names(days), n)),
                pa.array(np.concatenate(probs)),
                pa.array(np.concatenate(bought)),
            ],
            schema=_TRUTH_SCHEMA,
        )

    def _churn_truth(self, dormant: np.ndarray, first: int, days: range) -> pa.Table:
        """P(no event on D+1 .. D+3) for the snapshot days D of ``days``, ``dormant[:, i]`` being day
        ``first + i``'s hidden state."""
        if not days:
            return _CHURN_SCHEMA.empty_table()
        n = len(self.user_ids)
        return pa.table(
            [
                pa.array(np.tile(self.user_ids, len(days))),
                pa.array(np.repeat(self._day_names(days), n)),
                pa.array(
                    np.concatenate([self.p_no_event(dormant[:, d - first], d, CHURN_DAYS) for d in days])
                ),
            ],
            schema=_CHURN_SCHEMA,
        )


_TRUTH_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("day", pa.string()),  # snapshot day D: what is known at the end of D ...
        pa.field("p_buy_next_day", pa.float64()),  # ... the true probability of a purchase on D+1
        pa.field("bought_next_day", pa.bool_()),  # ... and whether the user did buy on D+1
    ]
)
_CHURN_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("day", pa.string()),  # snapshot day D, with the hidden state at the end of D known ...
        pa.field("p_churn_3d", pa.float64()),  # ... the true probability of no event on D+1 .. D+3
    ]
)


def iter_blocks(cfg: SimulatorConfig) -> Iterator[tuple[pa.Table, pa.Table, pa.Table]]:
    """Simulate block after block of users: yields (events, next-day purchase truth, churn truth)
    tables, in user order."""
    for _, days in _run_blocks(cfg):
        yield days.events, days.truth, days.churn


def _blocks(cfg: SimulatorConfig) -> Iterator[_Block]:
    world = _World(cfg)
    for block, first in enumerate(range(0, cfg.users, USERS_PER_BLOCK)):
        yield _Block(cfg, world, first, min(USERS_PER_BLOCK, cfg.users - first), block)


def _run_blocks(cfg: SimulatorConfig) -> Iterator[tuple[_Block, _BlockDays]]:
    for block in _blocks(cfg):
        yield block, block.run()


def simulate(
    cfg: SimulatorConfig,
    out: Path | str,
    *,
    flush_rows: int = 1_000_000,
    on_progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Simulate ``cfg`` and write it under ``out``, replacing an earlier simulation there atomically.

    Layout: ``events/day=YYYY-MM-DD/*.parquet`` (the event contract), ``truth/next_day_buy.parquet``
    (the oracle's next-day purchase probability per user and day), ``truth/churn_3d.parquet`` (the
    oracle's probability of no event on the 3 next days, per user and day D: only days with D+3
    simulated get a row), ``manifest.json`` (config, counts), and ``state/`` (where each block of users
    stands at the end of the last day, so that :func:`continue_simulation` can go on from there).

    Args:
        cfg: what to simulate.
        out: output folder; an existing one must be an earlier simulation (it has a manifest).
        flush_rows: events buffered before a write; bounds memory.
        on_progress: called with (users done, users in all) after each block.

    Returns:
        counts, behaviour mix, where it went and how long it took.
    """
    out = Path(out)
    check_replaceable(out, MANIFEST)
    started = _time.perf_counter()
    staging = staging_dir_for(out)
    try:
        writer = DayPartitionedWriter(staging / "events", cfg.timezone, flush_rows=flush_rows)
        (staging / "truth").mkdir()
        truth_writer = pq.ParquetWriter(staging / "truth" / "next_day_buy.parquet", _TRUTH_SCHEMA)
        churn_writer = pq.ParquetWriter(staging / "truth" / "churn_3d.parquet", _CHURN_SCHEMA)
        (staging / STATE).mkdir()
        counts: Counter = Counter()
        users_done = 0
        for index, (block, days) in enumerate(_run_blocks(cfg)):
            writer.add(days.events)
            truth_writer.write_table(days.truth)
            churn_writer.write_table(days.churn)
            days.state.save(_state_file(staging, index), block)
            counts.update(_behavior_counts(days.events))
            users_done = min(users_done + USERS_PER_BLOCK, cfg.users)
            if on_progress:
                on_progress(users_done, cfg.users)
        writer.close()
        truth_writer.close()
        churn_writer.close()
        seconds = _time.perf_counter() - started
        result = SimulationResult(
            out=out,
            events=writer.rows_written,
            users=cfg.users,
            days=sorted(writer.days),
            behavior_counts={b: counts.get(b, 0) for b in BEHAVIORS},
            files=writer.files_written,
            seconds=seconds,
            config=_jsonable_config(cfg),
        )
        manifest = {
            "generator": GENERATOR,
            "config": result.config,
            "events": result.events,
            "days": result.days,
            "behavior_counts": result.behavior_counts,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        publish_dir(staging, out)
        return result
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# Constants that act day by day, with the values they may take (inclusive) when shifted. Constants drawn
# once per user when a block is created (activity, preferred categories, lapse) are not here: shifting them
# would change who the users are, not how they behave from now on. The world's (items, Zipf exponent) are
# not either.
SHIFTABLE: dict[str, tuple[float, float]] = {
    "mean_session_views": (1.0, 1_000.0),
    "max_session_views": (1, 10_000),
    "weekend_factor": (0.0, 10.0),
    "p_return": (1e-9, 1.0),
    "dormant_activity": (0.0, 1.0),
    "p_related": (0.0, 1.0),
    "p_repeat": (0.0, 1.0),
    "p_same_category": (0.0, 1.0),
    "p_preferred_category": (0.0, 1.0),
    "p_cart": (0.0, 1.0),
    "p_fav": (0.0, 1.0),
    "intent_bias": (-20.0, 20.0),
    "intent_propensity": (-20.0, 20.0),
    "intent_open_items": (-20.0, 20.0),
    "intent_activity": (-20.0, 20.0),
    "extra_buys_mean": (0.0, 100.0),
    "p_buy_from_open": (0.0, 1.0),
    "p_cart_before_buy": (0.0, 1.0),
    "open_item_days": (1, 365),
}
_INTEGER_CONSTANTS = {"max_session_views", "open_item_days"}


def parse_shift(items: list[str]) -> dict[str, float]:
    """``["p_cart=0.15", "intent_bias=-0.8"]`` as ``{"p_cart": 0.15, "intent_bias": -0.8}``, checked
    (:func:`check_shift`)."""
    shift: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ShopsightError(f"shift {item!r}: expected KEY=VALUE, e.g. p_cart=0.15")
        if key in shift:
            raise ShopsightError(f"shift {key}: given twice")
        try:
            shift[key] = float(value)
        except ValueError:
            raise ShopsightError(f"shift {key}: {value.strip()!r} is not a number") from None
    return check_shift(shift)


def check_shift(shift: dict[str, float]) -> dict[str, float]:
    """The shift, its integer constants as ints; a :class:`ShopsightError` naming the key for an unknown or
    unshiftable constant or a value out of its range."""
    checked: dict[str, float] = {}
    for key, value in shift.items():
        if key not in SHIFTABLE:
            why = (
                "fixed for the whole simulation (who the users are, or the world)"
                if key in {f.name for f in fields(SimulatorConfig)}
                else "no such constant"
            )
            raise ShopsightError(f"shift {key}: {why}; these can be shifted: {', '.join(SHIFTABLE)}")
        low, high = SHIFTABLE[key]
        if not isinstance(value, int | float) or not math.isfinite(value) or not low <= value <= high:
            raise ShopsightError(f"shift {key}: {value!r} is out of range [{low:g}, {high:g}]")
        if key in _INTEGER_CONSTANTS:
            if value != int(value):
                raise ShopsightError(f"shift {key}: {value!r} is not a whole number")
            value = int(value)
        checked[key] = float(value) if key not in _INTEGER_CONSTANTS else value
    return checked


def _shifted(cfg: SimulatorConfig, shift: dict[str, float]) -> SimulatorConfig:
    """``cfg`` with ``shift`` applied, refused where the shifted constants do not fit together."""
    shifted = replace(cfg, **shift)
    browsing = shifted.p_related + shifted.p_repeat + shifted.p_same_category
    if browsing > 1.0:
        raise ShopsightError(
            f"shift: p_related + p_repeat + p_same_category would be {browsing:g}, above 1 (one draw decides "
            "between them)"
        )
    return shifted


def continue_simulation(
    out: Path | str,
    days: int,
    shift: dict[str, float] | None = None,
    *,
    flush_rows: int = 1_000_000,
    on_progress: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Extend the simulation in ``out`` by ``days`` days, for the same users and items, going on from where
    it stopped: the hidden dormancy, the open carts and the random streams are those saved at the end of its
    last day, so that behaviour on the new days follows from the old ones (and predictions made on the last
    day can be checked against what happens next).

    Each block of users is re-created from the saved config (its users' parameters come back identical),
    its random generator restored, and the new days simulated one at a time through the same day mechanics
    as a fresh run. Going on day by day means the result does not depend on how the continuation is split:
    ``days=2`` gives the same events as ``days=1`` twice. (It does differ from a fresh run of all the days,
    which draws each kind of randomness over all its days in bulk; the law is the same.)

    The old days' event files are hard-linked into the new folder, untouched. The oracles gain the rows of
    every snapshot day whose next day (next 3 days, for churn) is now simulated, the last old days included.
    The new folder is built beside ``out`` and swapped in at the end: a failure leaves ``out`` as it was.

    Args:
        out: a folder written by :func:`simulate` (or by an earlier continuation).
        days: how many days to add.
        shift: behavioural constants to change on the new days only (``{"p_cart": 0.15}``), as injected
            drift; the keys of :data:`SHIFTABLE`. The users stay those of the saved config, and the oracles
            use the shifted constants on these days, so they stay the truth.
        flush_rows: events buffered before a write; bounds memory.
        on_progress: called with (users done, users in all) after each block.

    Returns:
        what was added: the new days, their events and behaviour counts, where and how long.
    """
    out = Path(out)
    if days < 1:
        raise ShopsightError(f"days to add must be at least 1, not {days}")
    shift = check_shift(shift or {})
    manifest = _read_manifest(out)
    cfg = _config_from_manifest(manifest["config"], out)
    old_days, total = cfg.days, cfg.days + days
    n_blocks = math.ceil(cfg.users / USERS_PER_BLOCK)
    missing = [i for i in range(n_blocks) if not _state_file(out, i).is_file()]
    if missing:
        raise ShopsightError(
            f"{out} has no saved state to go on from (it was simulated before simulations saved one, or "
            f"{STATE}/ was removed); simulate it again with `shopsight data simulate`, then continue it"
        )
    grown = replace(cfg, days=total)
    day_name = [(cfg.start + timedelta(days=d)).isoformat() for d in range(total)]
    new_names = day_name[old_days:]
    clashing = [name for name in new_names if (out / "events" / f"day={name}").exists()]
    if clashing:
        raise ShopsightError(f"{out}: events of {clashing[0]} exist, beyond its {old_days} simulated days")
    shifts = dict(manifest.get("shifts", {}))
    if shift:
        shifts.update({name: shift for name in new_names})
    day_cfg = {d: _shifted(grown, shifts[name]) for d, name in enumerate(day_name) if name in shifts}

    started = _time.perf_counter()
    staging = staging_dir_for(out)
    try:
        _link_tree(out, staging, skip={"truth", STATE, MANIFEST})
        writer = DayPartitionedWriter(staging / "events", cfg.timezone, flush_rows=flush_rows)
        (staging / "truth").mkdir()
        (staging / STATE).mkdir()
        truth_writer = _copying_writer(out / "truth" / "next_day_buy.parquet", staging, _TRUTH_SCHEMA)
        churn_writer = _copying_writer(out / "truth" / "churn_3d.parquet", staging, _CHURN_SCHEMA)
        counts: Counter = Counter()
        users_done = 0
        for index, block in enumerate(_blocks(grown)):
            block.day_cfg = day_cfg
            state = _BlockState.load(_state_file(out, index), block)
            if state.last_day != old_days - 1:
                raise ShopsightError(
                    f"{_state_file(out, index)}: saved at day {state.last_day}, but {out} has {old_days} days"
                )
            block.rng.bit_generator.state = state.rng
            for day in range(old_days, total):
                went_on = block.simulate_days(day, 1, state)
                state = went_on.state
                writer.add(went_on.events)
                truth_writer.write_table(went_on.truth)
                churn_writer.write_table(went_on.churn)
                counts.update(_behavior_counts(went_on.events))
            state.save(_state_file(staging, index), block)
            users_done = min(users_done + USERS_PER_BLOCK, cfg.users)
            if on_progress:
                on_progress(users_done, cfg.users)
        writer.close()
        truth_writer.close()
        churn_writer.close()
        added = {b: counts.get(b, 0) for b in BEHAVIORS}
        manifest["config"]["days"] = total
        manifest["events"] += writer.rows_written
        manifest["days"] = sorted(set(manifest["days"]) | writer.days)
        manifest["behavior_counts"] = {b: manifest["behavior_counts"].get(b, 0) + added[b] for b in BEHAVIORS}
        if shifts:
            manifest["shifts"] = shifts  # per day: the constants that differed from the config's
        manifest.setdefault("continuations", []).append(
            {
                "days": new_names,
                "shift": shift,
                "events": writer.rows_written,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        publish_dir(staging, out)
        return SimulationResult(
            out=out,
            events=writer.rows_written,
            users=cfg.users,
            days=new_names,
            behavior_counts=added,
            files=writer.files_written,
            seconds=_time.perf_counter() - started,
            config=manifest["config"],
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _read_manifest(out: Path) -> dict:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        raise ShopsightError(f"{out} is not a simulation (no simulator {MANIFEST}); nothing to continue")
    return manifest


def _config_from_manifest(values: dict, out: Path) -> SimulatorConfig:
    known = {f.name for f in fields(SimulatorConfig)}
    try:
        return SimulatorConfig(
            **{k: v for k, v in values.items() if k in known and k != "start"},
            start=date.fromisoformat(values["start"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ShopsightError(
            f"{out / MANIFEST}: its config cannot be read back ({exc}); simulate it again"
        ) from None


def _state_file(root: Path, block: int) -> Path:
    return root / STATE / f"block-{block:05d}.npz"


def _behavior_counts(events: pa.Table) -> dict[str, int]:
    kinds, freq = np.unique(events.column("behavior").to_numpy(zero_copy_only=False), return_counts=True)
    return dict(zip(kinds.tolist(), freq.tolist(), strict=True))


def _link_tree(source: Path, target: Path, skip: set[str]) -> None:
    """Hard-link the files under ``source`` into ``target`` (a copy where links cannot be made, such as
    across filesystems), but for the top-level names in ``skip``: the old files stay as they are, at no cost
    in space or time."""
    for folder, subfolders, files in os.walk(source):
        relative = Path(folder).relative_to(source)
        if relative == Path("."):
            subfolders[:] = [name for name in subfolders if name not in skip]
            files = [name for name in files if name not in skip]
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(folder) / name, target / relative / name)
            except OSError:
                shutil.copy2(Path(folder) / name, target / relative / name)


def _copying_writer(source: Path, staging: Path, schema: pa.Schema) -> pq.ParquetWriter:
    """A writer of ``truth/<source's name>`` in ``staging`` that already holds ``source``'s rows (row group by
    row group, so memory stays bounded); the new rows follow them."""
    writer = pq.ParquetWriter(staging / "truth" / source.name, schema)
    if source.exists():
        for batch in pq.ParquetFile(source).iter_batches():
            writer.write_batch(batch.cast(schema))
    return writer


def _jsonable_config(cfg: SimulatorConfig) -> dict:
    values = asdict(cfg)
    values["start"] = cfg.start.isoformat()
    values["items"], values["categories"] = cfg.n_items, cfg.n_categories
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}
