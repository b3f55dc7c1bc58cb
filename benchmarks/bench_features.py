"""Feature benchmarks: the Spark feature job beside DuckDB, materialisation, online lookup latency.

1. Feature job at about 1M and 10M simulated events (9 days): wall time, events/s and peak memory
   (this process and its children: the Spark JVM) of the whole build, and, side by side on the same
   input, Spark's ``user_activity`` job against a single-node DuckDB query computing the same subset of
   user-activity features (counts per behaviour, distinct items and categories, active days, hours since
   the last event of each behaviour, for every window and snapshot day). The DuckDB result is compared
   with Spark's, so the ratio is between equal answers.
2. The online store in each layout, Feast's own (one value per feature) and the platform's packed plugin
   (one per entity and view, ``shopsight.features.packed``), on SQLite and on Redis (a redis-server
   started here on loopback), side by side over the same features: materialisation rows/s and peak
   memory, bytes stored per user.
3. Online lookup latency, p50/p99 over repeated calls, for 1 and 100 users: the Feast SDK
   (``get_online_features``), the feature server over HTTP (with a team's key),
   the serving path (``shopsight.features.online.OnlineFeatureReader``), and a raw read of the same rows'
   bytes from the store (the floor), for next_item_v1 (5 fields) and purchase_propensity_v1 (50 fields);
   for purchase_propensity_v1 each p99 beside its target and its ratio to the floor.

    python -m benchmarks.bench_features [--sizes 1000000 10000000] [--lookups 300]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import psutil

from benchmarks._machine import append_report, describe_machine

RESULTS = Path(__file__).parent / "results"
EVENTS_PER_USER = 90
START, END = date(2017, 11, 25), date(2017, 12, 2)


class PeakMemory:
    """Samples the resident memory of this process and its children (the JVM) every 50 ms."""

    def __enter__(self):
        self.peak = 0
        self.baseline = sum(
            p.memory_info().rss for p in [psutil.Process(), *psutil.Process().children(recursive=True)]
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a child may exit between listing and reading
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak / 2**20

    @property
    def added_mb(self) -> float:
        """Peak above what was resident when the phase began (e.g. a JVM already running)."""
        return max(0, self.peak - self.baseline) / 2**20


DUCKDB_ACTIVITY = """
WITH ev AS (
  SELECT user_id, item_id, category_id, behavior, ts,
         CAST(timezone('{tz}', ts) AS DATE) AS day FROM read_parquet('{events}/*/*.parquet')
),
days AS (SELECT CAST(d AS DATE) AS snapshot_day FROM range(DATE '{start}', DATE '{end}' + 1, INTERVAL 1 DAY) t(d)),
users AS (SELECT user_id, min(day) AS first_day FROM ev GROUP BY user_id),
grid AS (SELECT u.user_id, d.snapshot_day FROM users u JOIN days d ON u.first_day <= d.snapshot_day)
SELECT g.user_id, g.snapshot_day,
  {windowed},
  {recency}
FROM grid g JOIN ev e ON e.user_id = g.user_id AND e.day <= g.snapshot_day
GROUP BY g.user_id, g.snapshot_day
"""


def duckdb_activity(events: Path, windows, tz: str):
    import duckdb

    parts = []
    for w in windows:
        inside = f"e.day > g.snapshot_day - INTERVAL {w} DAY"
        parts += [
            f"count(*) FILTER (WHERE {inside} AND e.behavior = '{b}') AS n_{b}_{w}d"
            for b in ("pv", "cart", "fav", "buy")
        ]
        parts += [
            f"count(DISTINCT e.item_id) FILTER (WHERE {inside}) AS n_items_{w}d",
            f"count(DISTINCT e.category_id) FILTER (WHERE {inside}) AS n_categories_{w}d",
            f"count(DISTINCT e.day) FILTER (WHERE {inside}) AS active_days_{w}d",
        ]
    recency = [
        f"(epoch(timezone('{tz}', CAST(g.snapshot_day + 1 AS TIMESTAMP))) - epoch(max(e.ts) FILTER (WHERE e.behavior = '{b}'))) / 3600.0 AS hours_since_{b}"
        for b in ("pv", "cart", "fav", "buy")
    ]
    query = DUCKDB_ACTIVITY.format(
        tz=tz,
        events=events,
        start=START,
        end=END,
        windowed=",\n  ".join(parts),
        recency=",\n  ".join(recency),
    )
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    return con.execute(query).df()


def _feature_job(size: int, tmp: Path) -> dict:
    from shopsight.data import SimulatorConfig, simulate
    from shopsight.features import jobs
    from shopsight.features._spark import build_spark
    from shopsight.features.build import build_features
    from shopsight.platform import load_settings

    users = max(1, round(size / EVENTS_PER_USER))
    sim = simulate(SimulatorConfig(users=users, days=9, seed=0), tmp / "sim")
    settings = load_settings(
        overrides={"data_dir": str(tmp / "dd"), "spark.master": "local[2]", "spark.shuffle_partitions": "8",
                   "spark.driver_memory": "6g"}, environ={},
    )  # fmt: skip
    settings = settings.settings
    events = tmp / "sim" / "events"
    spark = build_spark(settings)

    with PeakMemory() as mem:
        started = time.perf_counter()
        build = build_features(settings, events, START, END)
        build_seconds = time.perf_counter() - started

    # side by side: Spark's user_activity job alone, and DuckDB on the same parquet
    frame = spark.read.parquet(str(events)).drop("day")
    days = jobs.snapshot_days(spark, START, END)
    end_ts = jobs.snapshot_days(spark, END, END).first()[jobs.SNAPSHOT_TS]
    from pyspark.sql import functions as F

    past = frame.filter(F.col("ts") < F.lit(end_ts))
    started = time.perf_counter()
    jobs.user_activity(past, days, settings.features.windows).write.mode("overwrite").parquet(str(tmp / "ua"))
    spark_seconds = time.perf_counter() - started
    with PeakMemory() as duck_mem:
        started = time.perf_counter()
        duck = duckdb_activity(events, settings.features.windows, settings.data.timezone)
        duck_seconds = time.perf_counter() - started

    import pandas as pd

    mine = pd.read_parquet(tmp / "ua")
    mine["snapshot_day"] = pd.to_datetime(mine["snapshot_day"]).dt.date
    duck["snapshot_day"] = pd.to_datetime(duck["snapshot_day"]).dt.date
    merged = mine.merge(duck, on=["user_id", "snapshot_day"], suffixes=("", "_duck"))
    columns = [c for c in duck.columns if c not in ("user_id", "snapshot_day")]
    mismatches = sum(
        int((~np.isclose(merged[c].astype(float), merged[f"{c}_duck"].astype(float), equal_nan=True)).sum())
        for c in columns
    )
    spark.stop()
    return {
        "events": sim.events,
        "users": users,
        "build_seconds": build_seconds,
        "build_events_per_second": sim.events / build_seconds,
        "build_peak_rss_mb": mem.mb,
        "rows": build.rows,
        "user_activity_spark_seconds": spark_seconds,
        "user_activity_duckdb_seconds": duck_seconds,
        "duckdb_added_rss_mb": duck_mem.added_mb,
        "spark_over_duckdb": spark_seconds / duck_seconds,
        "compared_rows": len(merged),
        "rows_spark": len(mine),
        "rows_duckdb": len(duck),
        "mismatched_values": mismatches,
        "compared_columns": len(columns),
        "data_dir": str(tmp / "dd"),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(samples) -> dict:
    ms = np.array(samples) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _store_benchmarks(data_dir: Path, lookups: int, tmp: Path) -> dict:
    """Materialisation, size and lookup latency of each online layout (Feast's own, and the platform's
    packed plugin) on SQLite and on a real Redis, over the same built features, side by side."""
    from shopsight.platform import load_settings

    port = _free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    results = {}
    try:
        for db, (layout, backend) in enumerate(
            (layout, backend) for backend in ("sqlite", "redis") for layout in ("feast", "packed")
        ):
            base = tmp / f"store_{layout}_{backend}"
            base.mkdir()
            (base / "features").symlink_to(data_dir / "features")
            overrides = {"data_dir": str(base), "feast.online_layout": layout}
            if backend == "redis":  # each layout in its own Redis database, so that sizes are its own
                overrides |= {
                    "feast.online_store": "redis",
                    "feast.redis_url": f"redis://127.0.0.1:{port}/{db}",
                }
            settings = load_settings(overrides=overrides, environ={}).settings
            results[f"{layout}/{backend}"] = _bench_backend(settings, data_dir, lookups, port, db)
            print(
                json.dumps({f"{layout}/{backend}": results[f"{layout}/{backend}"]}, default=str), flush=True
            )
    finally:
        redis_proc.terminate()
        redis_proc.wait()
    return results


SERVICES = {
    "next_item_v1": ("user_sequence",),
    "purchase_propensity_v1": ("user_activity", "user_sequence", "user_segment"),
}
PATHS = ("sdk", "http", "serving_path", "raw_floor")
# the lookups with a p99 target: (label, path, users, target)
TARGETS = (
    ("100 users, in process (serving path)", "serving_path", 100, "3 ms"),
    ("1 user, in process (serving path)", "serving_path", 1, "0.3 ms"),
    ("1 user over HTTP", "http", 1, "3 ms"),
    ("100 users over HTTP", "http", 100, "10 ms"),
    ("100 users, Feast SDK", "sdk", 100, "-"),
)
BENCH_KEY = "bench-key"


def _bench_backend(settings, data_dir: Path, lookups: int, redis_port: int, redis_db: int) -> dict:
    import gc

    import pandas as pd
    import redis

    from shopsight.features import store
    from shopsight.features.online import OnlineFeatureReader

    store.apply(settings)
    started = time.perf_counter()
    with PeakMemory() as memory:
        views = store.materialize(settings)
    seconds = time.perf_counter() - started
    rows = sum(len(pd.read_parquet(data_dir / "features" / v, columns=["snapshot_day"])) for v in views)
    users = pd.read_parquet(data_dir / "features" / "user_sequence", columns=["user_id"]).user_id.unique()
    entities = len(users)
    if settings.feast.online_store == "sqlite":
        stored_bytes = (settings.data_dir / "feast" / "online.db").stat().st_size
    else:
        client = redis.Redis(host="127.0.0.1", port=redis_port, db=redis_db)
        keys = list(client.scan_iter(count=10_000))
        stored_bytes = sum(client.memory_usage(k) or 0 for k in keys)
    entry = {
        "materialized_rows": rows,
        "materialize_seconds": seconds,
        "rows_per_second": rows / seconds,
        "materialize_peak_rss_mb": memory.mb,
        "entities": entities,
        "stored_bytes": stored_bytes,
        "bytes_per_entity": stored_bytes / entities,
    }

    rng = np.random.default_rng(0)
    packed = settings.feast.online_layout == "packed"
    for service, service_views in SERVICES.items():
        if settings.feast.online_store == "sqlite":
            raw = _sqlite_reader(settings.data_dir / "feast" / "online.db", service_views, packed)
        else:
            raw = _redis_reader(redis_port, redis_db, settings.feast.project, service_views, packed)
        assert all(raw(users[:5])), "the raw read missed rows: wrong key layout"
        server, http = _feature_server(settings, service)
        reader = OnlineFeatureReader(settings, service)
        readers = {
            "sdk": _sdk_reader(settings, service),
            "http": http,
            "serving_path": reader.read,
            "raw_floor": raw,
        }
        gc.collect()
        gc.freeze()  # as a long-lived server does after start-up (see shopsight.features.online)
        try:
            for n in (1, 100):
                for name, call in readers.items():
                    batches = [rng.choice(users, n) for _ in range(lookups)]
                    entry[f"{service}:{name}_{n}_rows"] = _latencies(call, batches)
        finally:
            gc.unfreeze()
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    return entry


def _latencies(call, batches) -> dict:
    for batch in batches[:20]:
        call(batch)  # warm up
    samples = []
    for batch in batches:
        started = time.perf_counter()
        call(batch)
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


def _sdk_reader(settings, name: str):
    from shopsight.features import store

    fs = store.feature_store(settings)
    service = fs.get_feature_service(name)
    return lambda batch: fs.get_online_features(
        features=service, entity_rows=[{"user_id": int(u)} for u in batch]
    ).to_dict()


def _sqlite_reader(db: Path, views, packed: bool):
    """The floor on SQLite: the stored bytes of the service's views for the users, not decoded."""
    import sqlite3

    con = sqlite3.connect(str(db))
    names = [name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    suffix = "_packed" if packed else ""
    tables = [next(t for t in names if t.endswith(view + suffix)) for view in views]
    key, value = ("k", "v") if packed else ("entity_key", "value")

    def read(batch):
        keys = [_sqlite_key(int(u)) for u in batch]
        marks = ",".join("?" * len(keys))
        found = set()
        for table in tables:
            query = f'SELECT {key}, {value} FROM "{table}" WHERE {key} IN ({marks})'
            found |= {row[0] for row in con.execute(query, keys).fetchall()}
        return [k in found for k in keys]

    return read


def _redis_reader(port: int, db: int, project: str, views, packed: bool):
    """The floor on Redis, pipelined: per user, its views' fields (packed) or its whole hash (Feast's
    layout keeps one field per feature, under hashed names)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, db=db)

    def read(batch):
        pipe = client.pipeline(transaction=False)
        for user in batch:
            if packed:
                pipe.hmget(_redis_key(int(user), project), list(views))
            else:
                pipe.hgetall(_redis_key(int(user), project))
        return [bool(h) and (not packed or all(h)) for h in pipe.execute()]

    return read


def _feature_server(settings, service: str):
    import requests

    from shopsight.platform.api_keys import hash_key

    port = _free_port()
    extra = ["--set", f"feast.online_layout={settings.feast.online_layout}"]
    if settings.feast.online_store == "redis":
        extra += ["--set", "feast.online_store=redis", "--set", f"feast.redis_url={settings.feast.redis_url}"]
    command = [sys.executable, "-m", "shopsight", "--data-dir", str(settings.data_dir), *extra]
    server = subprocess.Popen(
        [*command, "features", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={
            **os.environ,
            "XDG_RUNTIME_DIR": str(settings.data_dir),
            "SHOPSIGHT_SERVING__API_KEYS__SHOPSIGHT_FEATURES": hash_key(BENCH_KEY),
        },
    )
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {BENCH_KEY}"  # the services' owner: it needs no grant
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if session.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.5)

    def read(batch):
        body = {"feature_service": service, "entities": {"user_id": [int(u) for u in batch]}}
        response = session.post(f"{url}/get-online-features", json=body)
        assert response.status_code == 200, response.text

    return server, read


def _sqlite_key(user: int) -> bytes:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    return serialize_entity_key(EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=user)]), 3)


def _redis_key(user: int, project: str) -> bytes:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    key = EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=user)])
    return serialize_entity_key(key, 3) + project.encode()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--lookups", type=int, default=300)
    args = parser.parse_args()
    machine = describe_machine()
    runs, stores = [], {}
    with tempfile.TemporaryDirectory() as tmp_root:
        for index, size in enumerate(args.sizes):
            tmp = Path(tmp_root) / f"run{size}"
            tmp.mkdir()
            run = _feature_job(size, tmp)
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "rows"}, default=str))
            if index == 0 and shutil.which("redis-server"):
                stores = _store_benchmarks(Path(run["data_dir"]), args.lookups, tmp)
                print(json.dumps(stores, indent=1))
    RESULTS.mkdir(exist_ok=True)
    stamp = machine["date"][:10]
    (RESULTS / f"features-{stamp}.json").write_text(
        json.dumps({"machine": machine, "feature_jobs": runs, "stores": stores}, indent=2, default=str) + "\n"
    )
    lines = [
        f"\n## {machine['date']}: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}, Python {machine['python']}\n",
        "Feature build (all tables, Spark local[2]) and user_activity side by side with DuckDB (2 threads):\n",
        "| events | build s | build events/s | build peak RSS MB | user_activity Spark s | same features DuckDB s | Spark/DuckDB | DuckDB memory added MB | values compared | mismatches |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r['events']:,} | {r['build_seconds']:.1f} | {r['build_events_per_second']:,.0f} | {r['build_peak_rss_mb']:,.0f} | "
            f"{r['user_activity_spark_seconds']:.1f} | {r['user_activity_duckdb_seconds']:.1f} | {r['spark_over_duckdb']:.1f}x | "
            f"{r['duckdb_added_rss_mb']:,.0f} | {r['compared_rows'] * r['compared_columns']:,} | {r['mismatched_values']} |"
        )
    for name, entry in stores.items():
        lines.append(
            f"\n{name}: materialised {entry['materialized_rows']:,} rows in {entry['materialize_seconds']:.1f} s "
            f"({entry['rows_per_second']:,.0f} rows/s, peak RSS {entry['materialize_peak_rss_mb']:,.0f} MB); "
            f"{entry['stored_bytes'] / 1e6:,.1f} MB stored for {entry['entities']:,} users "
            f"({entry['bytes_per_entity']:,.0f} bytes a user). Lookup latency, p50 / p99 ms:\n"
        )
        lines.append("| service | path | 1 user | 100 users |")
        lines.append("| --- | --- | ---: | ---: |")
        for service in SERVICES:
            for path in PATHS:
                one, hundred = entry[f"{service}:{path}_1_rows"], entry[f"{service}:{path}_100_rows"]
                lines.append(
                    f"| {service} | {path} | {one['p50_ms']:.2f} / {one['p99_ms']:.2f} | {hundred['p50_ms']:.2f} / {hundred['p99_ms']:.2f} |"
                )
    if stores:
        lines += [
            "\npurchase_propensity_v1 (50 features), p99 ms, and its ratio to the same layout's raw read (the floor), "
            "Feast's own layout beside the packed one, measured in this run:\n",
            "| lookup | target | " + " | ".join(stores) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in stores) + " |",
        ]
        for label, path, n, target in TARGETS:
            cells = []
            for entry in stores.values():
                p99 = entry[f"purchase_propensity_v1:{path}_{n}_rows"]["p99_ms"]
                floor = entry[f"purchase_propensity_v1:raw_floor_{n}_rows"]["p99_ms"]
                cells.append(f"{p99:.2f} ({p99 / floor:.1f}x)")
            lines.append(f"| {label} | {target} | " + " | ".join(cells) + " |")
    append_report(RESULTS / "features.md", "Feature benchmarks", "python -m benchmarks.bench_features", lines)


if __name__ == "__main__":
    main()
