"""Feature jobs: pure functions ``DataFrame -> DataFrame`` over events in the contract's schema.

Every table is a daily snapshot "as of the end of day D" (shop-local, the Spark session's timezone):
a row for (entity, D) uses only events strictly before ``snapshot_ts`` = the first instant of D+1.
Each output carries ``snapshot_day`` (date, the partition), ``snapshot_ts`` (the Feast event time)
and ``created_ts`` (equal to ``snapshot_ts``, so that re-running a day writes identical bytes).

Rows exist for every day D from an entity's first event on, including days without events, so that a
point-in-time lookup at D never falls back to a stale row from an earlier day.

Definitions (what the tests recompute independently):
  * session: a user's events split where more than ``gap_minutes`` pass without an event; a session
    belongs to the day it starts on;
  * ``n_<behavior>_<w>d``: events of that behaviour on days D-w+1 .. D;
  * ``n_items_<w>d`` / ``n_categories_<w>d``: distinct items / categories in the window;
  * ``active_days_<w>d``: days in the window with at least one event;
  * ``n_sessions_<w>d``: sessions started in the window; ``mean_session_events_<w>d`` = events in the
    window / sessions started in it (0 when none);
  * ``cvr_buy_pv_<w>d`` = (buys + 1) / (views + 45) and ``cvr_buy_cart_<w>d`` = (buys + 1.1) / (carts + 3):
    additive smoothing toward Taobao's overall rates (2.2% and 36%), so that a user with 1 view and
    1 buy does not get a conversion rate of 100%;
  * ``hours_since_<behavior>``: hours from the user's last such event (any time before the snapshot)
    to ``snapshot_ts``; null if never;
  * ``share_night|morning|afternoon|evening``: share of the largest window's events in local hours
    0-6, 6-12, 12-18, 18-24;
  * ``top_categories``: the 3 categories with most events in the largest window (ties: smaller id),
    ``top_category_share`` the top one's share of those events;
  * ``n_carted_not_bought``: distinct items carted at some time before the snapshot and not bought since.

Labels look at the days after the snapshot instead (see :func:`labels`): ``buy_next_1d`` at D+1,
``churn_3d`` at D+1 .. D+3.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from shopsight.data.schema import BEHAVIORS, CATEGORY_ID, ITEM_ID, TS, USER_ID

__all__ = [
    "DAY_PARTS",
    "LABEL_HORIZON_DAYS",
    "category_stats",
    "labels",
    "sessionize",
    "snapshot_days",
    "user_activity",
    "user_sequence",
    "item_stats",
    "with_day",
]

LABEL_HORIZON_DAYS = 3  # the furthest a label looks past its snapshot day: churn_3d's D+3
SNAPSHOT_DAY = "snapshot_day"
SNAPSHOT_TS = "snapshot_ts"
CREATED_TS = "created_ts"
DAY_PARTS = ("night", "morning", "afternoon", "evening")
# Additive smoothing (numerator, denominator) toward Taobao's overall conversion rates.
_CVR_BUY_PV = (1.0, 45.0)  # 1/45 = 2.2%
_CVR_BUY_CART = (1.1, 3.0)  # 1.1/3 = 36%


def with_day(events: DataFrame) -> DataFrame:
    """Add ``day``: the shop-local date of each event (the session timezone is the shop's)."""
    return events.withColumn("day", F.to_date(F.col(TS)))


def snapshot_days(spark, start: date, end: date) -> DataFrame:
    """One row per day D in ``[start, end]``, with ``snapshot_ts`` = the first instant of D+1."""
    return spark.sql(
        f"SELECT explode(sequence(DATE'{start.isoformat()}', DATE'{end.isoformat()}')) AS {SNAPSHOT_DAY}"
    ).withColumn(SNAPSHOT_TS, _snapshot_ts(F.col(SNAPSHOT_DAY)))


def _snapshot_ts(day: Column) -> Column:
    # the session timezone is the shop's: casting a date gives its local midnight
    return F.date_add(day, 1).cast("timestamp")


def sessionize(events: DataFrame, gap_minutes: int = 30) -> DataFrame:
    """Add ``session_start`` (1 on an event that starts a session, else 0) and ``session_id``."""
    order = Window.partitionBy(USER_ID).orderBy(TS, ITEM_ID, "behavior")
    previous = F.lag(TS).over(order)
    gap = F.col(TS).cast("long") - previous.cast("long")
    start = F.when(previous.isNull() | (gap > gap_minutes * 60), 1).otherwise(0)
    return events.withColumn("session_start", start).withColumn(
        "session_id", F.sum("session_start").over(order.rowsBetween(Window.unboundedPreceding, 0))
    )


def _entity_day_grid(daily: DataFrame, keys: Sequence[str], days: DataFrame) -> DataFrame:
    """(entity, day) for every day from the entity's first event day to the last snapshot day."""
    first = daily.groupBy(*keys).agg(F.min("day").alias("first_day"))
    last_day = days.agg(F.max(SNAPSHOT_DAY)).first()[0]
    first = first.filter(F.col("first_day") <= F.lit(last_day))
    return first.select(*keys, F.explode(F.sequence("first_day", F.lit(last_day))).alias("day"))


def _windowed(dense: DataFrame, keys: Sequence[str], width: int):
    """A window over the last ``width`` days of a dense (entity, day) table."""
    return Window.partitionBy(*keys).orderBy(F.col("day_number")).rangeBetween(-(width - 1), 0)


def _densify(daily: DataFrame, keys: Sequence[str], days: DataFrame, zero_fill: Sequence[str]) -> DataFrame:
    grid = _entity_day_grid(daily, keys, days)
    dense = grid.join(daily, [*keys, "day"], "left").withColumn(
        "day_number", F.datediff("day", F.lit("1970-01-01"))
    )
    return dense.fillna(0, subset=list(zero_fill))


def _count_columns() -> list[Column]:
    return [F.sum(F.when(F.col("behavior") == b, 1).otherwise(0)).alias(f"n_{b}") for b in BEHAVIORS]


def _to_snapshots(dense: DataFrame, days: DataFrame) -> DataFrame:
    return (
        dense.join(days.withColumnRenamed(SNAPSHOT_DAY, "day"), "day")
        .withColumnRenamed("day", SNAPSHOT_DAY)
        # Feast's created_ts says when a row was made; the wall clock would make every build's bytes
        # differ. A row is complete once its snapshot's day has ended, and a re-run of that day makes
        # the same row, so the snapshot's end is when it was made, whenever the build ran.
        .withColumn(CREATED_TS, F.col(SNAPSHOT_TS))
    )


def user_activity(
    events: DataFrame, days: DataFrame, windows: Sequence[int] = (1, 3, 7), gap_minutes: int = 30
) -> DataFrame:
    """User activity per (user_id, snapshot_day): see the module docstring for each feature."""
    windows = sorted(windows)
    widest = windows[-1]
    ev = sessionize(with_day(events), gap_minutes).withColumn("hour", F.hour(TS))
    part = F.when(F.col("hour") < 6, "night").when(F.col("hour") < 12, "morning")
    part = part.when(F.col("hour") < 18, "afternoon").otherwise("evening")
    daily = ev.groupBy(USER_ID, "day").agg(
        F.count(F.lit(1)).alias("n_events"),
        *_count_columns(),
        F.collect_set(ITEM_ID).alias("items"),
        F.collect_set(CATEGORY_ID).alias("categories"),
        F.sum("session_start").alias("n_sessions"),
        *[F.sum(F.when(part == p, 1).otherwise(0)).alias(f"n_{p}") for p in DAY_PARTS],
        *[F.max(F.when(F.col("behavior") == b, F.col(TS))).alias(f"last_{b}_ts") for b in BEHAVIORS],
    )
    counted = ["n_events", *[f"n_{b}" for b in BEHAVIORS], "n_sessions", *[f"n_{p}" for p in DAY_PARTS]]
    dense = _densify(daily, [USER_ID], days, counted).withColumn(
        "active", (F.col("n_events") > 0).cast("int")
    )

    columns = []
    for w in windows:
        win = _windowed(dense, [USER_ID], w)
        for b in BEHAVIORS:
            columns.append(F.sum(f"n_{b}").over(win).alias(f"n_{b}_{w}d"))
        columns.append(
            F.size(F.array_distinct(F.flatten(F.collect_list("items").over(win)))).alias(f"n_items_{w}d")
        )
        columns.append(
            F.size(F.array_distinct(F.flatten(F.collect_list("categories").over(win)))).alias(
                f"n_categories_{w}d"
            )
        )
        columns.append(F.sum("active").over(win).alias(f"active_days_{w}d"))
        columns.append(F.sum("n_sessions").over(win).alias(f"n_sessions_{w}d"))
        columns.append(F.sum("n_events").over(win).alias(f"_events_{w}d"))
    wide = _windowed(dense, [USER_ID], widest)
    for p in DAY_PARTS:
        columns.append(F.sum(f"n_{p}").over(wide).alias(f"_{p}"))
    history = Window.partitionBy(USER_ID).orderBy("day_number").rowsBetween(Window.unboundedPreceding, 0)
    for b in BEHAVIORS:
        columns.append(F.max(f"last_{b}_ts").over(history).alias(f"_last_{b}_ts"))

    rolled = dense.select(USER_ID, "day", *columns)
    snap = _to_snapshots(rolled, days)
    derived = []
    for w in windows:
        sessions, n_events = F.col(f"n_sessions_{w}d"), F.col(f"_events_{w}d")
        derived.append(
            F.when(sessions > 0, n_events / sessions).otherwise(0.0).alias(f"mean_session_events_{w}d")
        )
        derived.append(
            ((F.col(f"n_buy_{w}d") + _CVR_BUY_PV[0]) / (F.col(f"n_pv_{w}d") + _CVR_BUY_PV[1])).alias(
                f"cvr_buy_pv_{w}d"
            )
        )
        derived.append(
            ((F.col(f"n_buy_{w}d") + _CVR_BUY_CART[0]) / (F.col(f"n_cart_{w}d") + _CVR_BUY_CART[1])).alias(
                f"cvr_buy_cart_{w}d"
            )
        )
    widest_events = F.col(f"_events_{widest}d")
    for p in DAY_PARTS:
        derived.append(
            F.when(widest_events > 0, F.col(f"_{p}") / widest_events).otherwise(0.0).alias(f"share_{p}")
        )
    for b in BEHAVIORS:
        seconds = F.col(SNAPSHOT_TS).cast("long") - F.col(f"_last_{b}_ts").cast("long")
        derived.append((seconds / 3600.0).alias(f"hours_since_{b}"))
    keep = [c for c in snap.columns if not c.startswith("_")]
    result = snap.select(*keep, *derived)
    result = result.join(_top_categories(ev, days, widest), [USER_ID, SNAPSHOT_DAY], "left")
    result = result.join(_carted_not_bought(ev, days), [USER_ID, SNAPSHOT_DAY], "left")
    return result.fillna(0, subset=["n_carted_not_bought", "top_category_share"]).withColumn(
        "top_categories", F.coalesce("top_categories", F.array().cast("array<bigint>"))
    )


def _top_categories(ev: DataFrame, days: DataFrame, widest: int) -> DataFrame:
    per_day = ev.groupBy(USER_ID, CATEGORY_ID, "day").agg(F.count(F.lit(1)).alias("n"))
    in_window = per_day.join(
        days, (per_day.day <= F.col(SNAPSHOT_DAY)) & (per_day.day > F.date_sub(F.col(SNAPSHOT_DAY), widest))
    )
    totals = in_window.groupBy(USER_ID, SNAPSHOT_DAY, CATEGORY_ID).agg(F.sum("n").alias("n"))
    rank = Window.partitionBy(USER_ID, SNAPSHOT_DAY).orderBy(F.desc("n"), F.asc(CATEGORY_ID))
    ranked = totals.withColumn("rank", F.row_number().over(rank)).withColumn(
        "all", F.sum("n").over(Window.partitionBy(USER_ID, SNAPSHOT_DAY))
    )
    top = ranked.filter(F.col("rank") <= 3)
    return top.groupBy(USER_ID, SNAPSHOT_DAY).agg(
        F.transform(
            F.array_sort(F.collect_list(F.struct("rank", CATEGORY_ID))), lambda s: s[CATEGORY_ID]
        ).alias("top_categories"),
        F.max(F.when(F.col("rank") == 1, F.col("n") / F.col("all"))).alias("top_category_share"),
    )


def _carted_not_bought(ev: DataFrame, days: DataFrame) -> DataFrame:
    funnel = ev.filter(F.col("behavior").isin("cart", "buy"))
    after = (
        Window.partitionBy(USER_ID, ITEM_ID).orderBy(TS, "behavior").rowsBetween(1, Window.unboundedFollowing)
    )
    carts = funnel.withColumn(
        "next_buy_day", F.min(F.when(F.col("behavior") == "buy", F.col("day"))).over(after)
    )
    carts = carts.filter(F.col("behavior") == "cart")
    # A cart is open on D if made on or before D and its item not bought on or before D since.
    open_on = carts.join(
        days,
        (carts.day <= F.col(SNAPSHOT_DAY))
        & (carts.next_buy_day.isNull() | (carts.next_buy_day > F.col(SNAPSHOT_DAY))),
    )
    return open_on.groupBy(USER_ID, SNAPSHOT_DAY).agg(F.countDistinct(ITEM_ID).alias("n_carted_not_bought"))


def user_sequence(events: DataFrame, days: DataFrame, length: int = 50) -> DataFrame:
    """The last ``length`` events before each snapshot, oldest first, as parallel arrays.

    Columns: ``seq_item_ids``, ``seq_category_ids``, ``seq_behaviors``, ``seq_ts`` (unix seconds),
    ``seq_length``.
    """
    ev = with_day(events)
    daily = ev.groupBy(USER_ID, "day").agg(
        F.array_sort(
            F.collect_list(F.struct(F.col(TS).cast("long").alias("t"), ITEM_ID, CATEGORY_ID, "behavior"))
        ).alias("events")
    )
    # Each active day holds at least one event: the last `length` events lie in the last `length` active days.
    recent = Window.partitionBy(USER_ID).orderBy("day").rowsBetween(-(length - 1), 0)
    rolled = daily.withColumn("seq", F.flatten(F.collect_list("events").over(recent)))
    rolled = rolled.withColumn(
        "seq", F.slice("seq", F.greatest(F.size("seq") - length + 1, F.lit(1)), length)
    )
    dense = _densify(rolled.select(USER_ID, "day", F.lit(1).alias("active")), [USER_ID], days, ["active"])
    last_active = Window.partitionBy(USER_ID).orderBy("day").rowsBetween(Window.unboundedPreceding, 0)
    dense = dense.withColumn(
        "active_day", F.max(F.when(F.col("active") == 1, F.col("day"))).over(last_active)
    )
    joined = dense.select(USER_ID, "day", "active_day").join(
        rolled.select(USER_ID, F.col("day").alias("active_day"), "seq"), [USER_ID, "active_day"]
    )
    snap = _to_snapshots(joined, days)
    return snap.select(
        USER_ID,
        SNAPSHOT_DAY,
        SNAPSHOT_TS,
        CREATED_TS,
        F.col(f"seq.{ITEM_ID}").alias("seq_item_ids"),
        F.col(f"seq.{CATEGORY_ID}").alias("seq_category_ids"),
        F.col("seq.behavior").alias("seq_behaviors"),
        F.col("seq.t").alias("seq_ts"),
        F.size("seq").alias("seq_length"),
    )


def _entity_stats(
    events: DataFrame, days: DataFrame, key: str, windows: Sequence[int], extra=()
) -> DataFrame:
    windows = sorted(windows)
    ev = with_day(events)
    daily = ev.groupBy(key, "day").agg(*_count_columns(), F.collect_set(USER_ID).alias("users"), *extra)
    counted = [f"n_{b}" for b in BEHAVIORS]
    dense = _densify(daily, [key], days, counted)
    columns = []
    for w in windows:
        win = _windowed(dense, [key], w)
        columns += [F.sum(f"n_{b}").over(win).alias(f"n_{b}_{w}d") for b in BEHAVIORS]
        columns.append(
            F.size(F.array_distinct(F.flatten(F.collect_list("users").over(win)))).alias(f"n_users_{w}d")
        )
    rolled = dense.select(key, "day", *columns)
    widest = windows[-1]
    snap = _to_snapshots(rolled, days)
    return snap.withColumn(
        f"cvr_buy_pv_{widest}d",
        (F.col(f"n_buy_{widest}d") + _CVR_BUY_PV[0]) / (F.col(f"n_pv_{widest}d") + _CVR_BUY_PV[1]),
    )


def item_stats(events: DataFrame, days: DataFrame, windows: Sequence[int] = (1, 3, 7)) -> DataFrame:
    """Per (item_id, snapshot_day): counts per behaviour, unique users, conversion, and the category."""
    stats = _entity_stats(events, days, ITEM_ID, windows)
    category = events.groupBy(ITEM_ID).agg(F.max(CATEGORY_ID).alias(CATEGORY_ID))
    return stats.join(category, ITEM_ID, "left")


def category_stats(events: DataFrame, days: DataFrame, windows: Sequence[int] = (1, 3, 7)) -> DataFrame:
    """Per (category_id, snapshot_day): counts per behaviour and unique users over the windows, conversion."""
    return _entity_stats(events, days, CATEGORY_ID, windows)


def labels(events: DataFrame, days: DataFrame) -> DataFrame:
    """The labels per (user_id, snapshot_day D):

      * ``buy_next_1d``: does the user buy anything on D+1?
      * ``churn_3d``: does the user have no event at all on D+1 .. D+3?

    The last day with an event is the last one observed. Only snapshot days before it get a row (the
    next day, and so ``buy_next_1d``, is known there); ``churn_3d`` is null, unknown rather than False,
    where D+3 lies past it: a user quiet on the observed days may still come back on an unobserved one,
    so training sets for churn drop those rows while those for purchases keep them. Users are those
    with an event on or before D (the entities that have features at D).
    """
    ev = with_day(events)
    last_day = ev.agg(F.max("day")).first()[0]
    labelled = days.filter(F.col(SNAPSHOT_DAY) < F.lit(last_day))
    daily = ev.groupBy(USER_ID, "day").agg(
        F.max((F.col("behavior") == "buy").cast("int")).alias("bought"), F.count(F.lit(1)).alias("n_events")
    )
    dense = _densify(
        daily,
        [USER_ID],
        days.union(
            days.sparkSession.createDataFrame([(last_day,)], [SNAPSHOT_DAY]).withColumn(
                SNAPSHOT_TS, _snapshot_ts(F.col(SNAPSHOT_DAY))
            )
        ),
        ["bought", "n_events"],
    )
    nxt = Window.partitionBy(USER_ID).orderBy("day_number")
    # lead() looks one row ahead; the grid is dense, so the next row is the next day
    dense = dense.withColumn("buy_next_1d", F.lead("bought", 1, 0).over(nxt) == 1)
    observed = F.date_add(F.col("day"), LABEL_HORIZON_DAYS) <= F.lit(last_day)
    later = F.sum("n_events").over(nxt.rangeBetween(1, LABEL_HORIZON_DAYS))
    dense = dense.withColumn("churn_3d", F.when(observed, later == 0))  # no otherwise: null when unknown
    return _to_snapshots(dense.select(USER_ID, "day", "buy_next_1d", "churn_3d"), labelled)


def user_segments(activity: DataFrame, k: int, windows: Sequence[int] = (1, 3, 7), seed: int = 0):
    """KMeans segments of users on standardised activity (log counts), fitted on the last snapshot day.

    Returns ``(segments, profile, silhouette)``: per (user_id, snapshot_day) a ``segment_id`` for every
    snapshot day (assigned with the model of the last day, so ids mean the same on every day); the
    profile of each segment on the last day (size and mean raw features: the user portrait) as a list
    of dicts; and the silhouette score of the last day's clustering.

    ``k`` is capped at the number of distinct users' feature vectors on the last day (a small or
    one-day input has few: most users there have a single view). With fewer than two, every user is
    in segment 0 and the silhouette, undefined for one cluster, is NaN.
    """
    from pyspark.ml import Pipeline
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.evaluation import ClusteringEvaluator
    from pyspark.ml.feature import StandardScaler, VectorAssembler

    w = max(windows)
    raw = [f"n_{b}_{w}d" for b in BEHAVIORS] + [
        f"n_items_{w}d",
        f"n_categories_{w}d",
        f"active_days_{w}d",
        f"n_sessions_{w}d",
        "n_carted_not_bought",
    ]
    rates = [f"cvr_buy_pv_{w}d", "share_evening"]
    logged = activity.select(
        USER_ID,
        SNAPSHOT_DAY,
        SNAPSHOT_TS,
        CREATED_TS,
        *raw,
        *rates,
        *[F.log1p(c).alias(f"_log_{c}") for c in raw],
    )
    last_day = activity.agg(F.max(SNAPSHOT_DAY)).first()[0]
    # The fit must see the same rows in the same order on every run, or the segments change from one
    # build of the same input to the next: k-means|| seeds from rows drawn by partition and position,
    # and the scaler's moments and each step's centres are floating-point sums merged in the order the
    # tasks finish. The rows come out of shuffles, whose order varies with timing, so they go into one
    # partition in user order (one row per user on the last day): one task sums them, always in that
    # order. The profile and the silhouette below are then sums over the same single ordered partition.
    last = (
        logged.filter(F.col(SNAPSHOT_DAY) == F.lit(last_day))
        .repartition(1)
        .sortWithinPartitions(USER_ID)
        .cache()
    )
    inputs = [f"_log_{c}" for c in raw] + rates
    # Spark's KMeans fails (ArrayIndexOutOfBounds) when it finds fewer distinct points than k.
    k = min(k, last.select(*inputs).distinct().count())
    if k < 2:
        scored_last = last.withColumn("segment_id", F.lit(0))
        silhouette = float("nan")
        segments = logged.withColumn("segment_id", F.lit(0))
    else:
        pipeline = Pipeline(
            stages=[
                VectorAssembler(inputCols=inputs, outputCol="_vector"),
                StandardScaler(inputCol="_vector", outputCol="_scaled", withMean=True, withStd=True),
                KMeans(featuresCol="_scaled", predictionCol="segment_id", k=k, seed=seed),
            ]
        )
        model = pipeline.fit(last)
        scored_last = model.transform(last)
        silhouette = ClusteringEvaluator(featuresCol="_scaled", predictionCol="segment_id").evaluate(
            scored_last
        )
        segments = model.transform(logged)
    profile_rows = (
        scored_last.groupBy("segment_id")
        .agg(F.count(F.lit(1)).alias("size"), *[F.avg(c).alias(f"mean_{c}") for c in raw + rates])
        .orderBy("segment_id")
        .collect()
    )
    last.unpersist()
    profile = [{**row.asDict(), "snapshot_day": last_day.isoformat()} for row in profile_rows]
    segments = segments.select(
        USER_ID, SNAPSHOT_DAY, SNAPSHOT_TS, CREATED_TS, F.col("segment_id").cast("long").alias("segment_id")
    )
    return segments, profile, float(silhouette)
