"""Serving benchmark: the Ray Serve application over HTTP, beside the floors measured in the same run.

World: features of the Taobao sample (or ``--events``) built with Spark, applied and materialised into
Feast's SQLite online store; a next-item SASRec (max_len 50, d_model 48, 2 heads, 2 blocks: the demo's
shape) and a purchase SASRec registered in a local MLflow server as champions; the application deployed
on a local Ray (2 CPUs: one per model deployment, the ingress unreserved).

Measured:

1. Floors, in this process, one thread: the bare Feast lookup (``OnlineFeatureReader.read`` of one user),
   the bare model forward pass (``model.predict`` of one 50-item history + top-k; the purchase pyfunc on
   one feature row, and its network alone), and the framework-free predictor (lookup + tensors + model +
   response objects) without HTTP or Ray.
2. Over HTTP, closed loop (asyncio + aiohttp, ``c`` requests in flight): latency p50/p99 and throughput at
   concurrency 1, 8 and 32, for ``POST /v1/recommendations`` (users with a 50-item history, k=10) and
   ``POST /v1/purchase-propensity`` (one user per request), with a breakdown from the ``Server-Timing``
   header: feature lookup, model (both for the batch the request was in) and the rest (HTTP, proxy,
   ingress, Ray calls, batch wait, queueing). With ``@serve.batch`` (max_batch_size 16) and without
   (max_batch_size 1; a lightweight user_config update of the same replicas), in the ``combined`` layout
   (one deployment: API and models), then the ``split`` layout (ingress + a deployment per model) with
   batching. Zero errors is asserted.
3. The floor of Ray Serve itself on this machine, same run: a FastAPI replica that echoes the request
   body, through the same proxy, at concurrency 1 and 8.
4. The prediction log's cost: both endpoints at concurrency 8 in the first layout with batching, the log
   off and on in alternating rounds (a user_config update of the same replicas, so nothing else changes;
   alternating spreads the machine's drift over both), p99 of each round and the median of the rounds',
   and the p99 of each mode's requests pooled over the rounds, with a 95% interval of the ratio. The spool
   is rolled every ``--log-roll-s`` (5 s, twelve times the default) so that its conversions run inside the
   rounds with the log on. Every other run above has the log on (the default).

    python -m benchmarks.bench_serving [--seconds 10] [--concurrency 1 8 32] [--layouts combined split]
        [--log-rounds 3] [--log-roll-s 5] [--only-log]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from benchmarks._machine import append_report, describe_machine

RESULTS = Path(__file__).parent / "results"
SAMPLE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "taobao" / "UserBehavior_sample_10k.csv"
)
START, END = date(2017, 11, 25), date(2017, 12, 2)
KEY = "bench-key"
TARGET_P99_MS = 25.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values) -> dict[str, float]:
    ms = np.asarray(values, dtype=np.float64) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": int(len(ms))}


def _time(fn, n: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return _pct(samples)


def _register(settings, tmp: Path) -> tuple[str, str]:
    """A next-item and a purchase SASRec of the demo's shape, registered and set as champions."""
    import mlflow
    import pandas as pd
    import torch
    from mlflow import MlflowClient

    from shopsight.features import store
    from shopsight.platform.mlflow_server import tracking_uri
    from shopsight.training.binary.data import SnapshotFeatures
    from shopsight.training.binary.pyfunc import input_example, log_snapshot_model
    from shopsight.training.binary.pyfunc import save_model_dir as save_purchase
    from shopsight.training.models import build_model
    from shopsight.training.next_item.data import SequenceData
    from shopsight.training.next_item.pyfunc import log_next_item_model
    from shopsight.training.next_item.pyfunc import save_model_dir as save_next_item

    torch.manual_seed(0)
    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-serving")
    sequences = SequenceData.from_file(settings.data_dir / "events.csv")
    shape = {"max_len": 50, "d_model": 48, "n_heads": 2, "n_blocks": 2, "dropout": 0.2}
    model = build_model("sasrec", n_items=sequences.n_items, **shape).eval()
    folder = save_next_item(tmp / "next_item", "sasrec", model, sequences.item_ids)
    example = pd.DataFrame({"item_ids": [sequences.item_ids[sequences.sequences[0][-5:]].tolist()]})
    with mlflow.start_run(run_name="bench-next-item"):
        next_item = log_next_item_model(folder, example, registered_name="shopsight-next-item")
    path, _ = store.training_set(
        settings, "purchase_propensity_v1", START, END - date.resolution, tmp / "ts.parquet"
    )
    frame = pd.read_parquet(path)
    features = SnapshotFeatures.fit(frame)
    purchase_model = build_model(
        "sasrec", n_items=features.n_items, n_dense=features.n_dense, n_categories=features.n_categories,
        **shape,
    ).eval()  # fmt: skip
    folder = save_purchase(tmp / "purchase", "sasrec", purchase_model, features)
    with mlflow.start_run(run_name="bench-purchase"):
        purchase = log_snapshot_model(
            folder, input_example(frame.head(5)), registered_name="shopsight-purchase"
        )
    client = MlflowClient(uri)
    client.set_registered_model_alias(
        "shopsight-next-item", "champion", str(next_item.registered_model_version)
    )
    client.set_registered_model_alias(
        "shopsight-purchase", "champion", str(purchase.registered_model_version)
    )
    return str(next_item.registered_model_version), str(purchase.registered_model_version)


def _floors(settings, users: list[int], n: int) -> dict:
    """Bare lookups, bare forward passes and the in-process predictor, one thread, like one replica."""
    import torch

    from shopsight.features.online import OnlineFeatureReader
    from shopsight.platform.mlflow_server import tracking_uri
    from shopsight.serving.models import MlflowModelSource, item_popularity
    from shopsight.serving.predictor import ProbabilityPredictor, RecommendationPredictor, feature_frame
    from shopsight.serving.schemas import PropensityRequest, RecommendationRequest
    from shopsight.training.binary.pyfunc import SnapshotClassifier
    from shopsight.training.next_item.pyfunc import NextItemRecommender

    torch.set_num_threads(1)
    uri = tracking_uri(settings)
    next_item_source = MlflowModelSource(
        uri, "shopsight-next-item", NextItemRecommender, item_popularity(settings)
    )
    purchase_source = MlflowModelSource(uri, "shopsight-purchase", SnapshotClassifier)
    rec = next_item_source.load(next_item_source.resolve("champion"), "champion")
    buy = purchase_source.load(purchase_source.resolve("champion"), "champion")
    seq_reader = OnlineFeatureReader(settings, "next_item_v1", ["seq_item_ids"])
    all_reader = OnlineFeatureReader(settings, "purchase_propensity_v1")
    out: dict[str, dict] = {}
    it = iter(range(10**9))

    def user() -> int:
        return users[next(it) % len(users)]

    out["feast lookup next_item_v1 (1 user)"] = _time(lambda: seq_reader.read([user()]), n)
    out["feast lookup purchase_propensity_v1 (1 user)"] = _time(lambda: all_reader.read([user()]), n)
    history = seq_reader.read([users[0]])["seq_item_ids"][0]
    known = [rec.model.index[int(i)] for i in history if int(i) in rec.model.index][-50:]
    seq = torch.zeros((1, 50), dtype=torch.long)
    seq[0, 50 - len(known) :] = torch.as_tensor(known)
    seq8 = seq.expand(8, -1).contiguous()

    def forward(batch):
        with torch.no_grad():
            return torch.topk(rec.model.model.predict(batch), 10, dim=1)

    out["next-item forward + top-k (1 history of 50)"] = _time(lambda: forward(seq), n)
    out["next-item forward + top-k (batch of 8)"] = _time(lambda: forward(seq8), n)
    row = feature_frame(all_reader.read([users[0]]), buy.loaded_at)
    out["purchase pyfunc predict (1 row: transform + network)"] = _time(
        lambda: buy.model.predict(None, row), n
    )
    tensors = [torch.as_tensor(a) for a in buy.model.features.transform(row, need_label=False).inputs()]

    def purchase_forward():
        with torch.no_grad():
            return buy.model.model.user_proba(*tensors)

    out["purchase network forward (1 row)"] = _time(purchase_forward, n)
    recommender = RecommendationPredictor(seq_reader, "shopsight-next-item")
    recommender.swap(champion=rec)
    propensity = ProbabilityPredictor(all_reader, "shopsight-purchase")
    propensity.swap(champion=buy)
    out["predictor recommend (lookup + model + response, no HTTP)"] = _time(
        lambda: recommender.answer([RecommendationRequest(user_id=user(), k=10)]), n
    )
    out["predictor propensity (lookup + model + response, no HTTP)"] = _time(
        lambda: propensity.answer([PropensityRequest(user_ids=[user()])]), n
    )
    return out


def _log_write_floor(tmp: Path, n: int) -> dict:
    """What the prediction log adds to a batch, in process: the records of 16 answers (a full
    @serve.batch), packed and written to a spool file; propensity answers carry 50 features each,
    recommendations a 50-item history and 10 items."""
    from datetime import UTC, datetime

    from shopsight.serving.prediction_log import PredictionLog, RequestContext, log_answers
    from shopsight.serving.predictor import Answered, Outcome

    log = PredictionLog(tmp / "floor-spool", tmp / "floor-predictions", roll_interval_s=0)
    now = datetime.now(UTC)
    contexts = [RequestContext(f"r{i}", "bench") for i in range(16)]
    features = {f"feature_{j}": float(j) for j in range(46)} | {
        "seq_item_ids": list(range(50)),
        "top_categories": [1, 2, 3],
    }
    kinds = {
        "propensity": lambda i: Answered("champion", "1", i, dict(features), probability=0.1),
        "recommendation": lambda i: Answered(
            "champion", "1", i, {"seq_item_ids": list(range(50))}, list(range(10)), [0.5] * 10
        ),
    }
    out = {}
    for kind, answer in kinds.items():

        def write(answer=answer) -> None:
            outcomes = [Outcome(answered=[answer(i)], as_of=now) for i in range(16)]
            log_answers(log, "bench", "model", outcomes, contexts, 1.0)

        out[f"prediction log: 16 {kind} answers logged (in process)"] = _time(write, n)
    log.close()
    return out


def _echo_app():
    """A FastAPI replica that returns the request body: Ray Serve's own round trip, no work."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(api)
    class Echo:
        @api.post("/")
        async def echo(self, body: dict) -> dict:
            return body

    return Echo.bind()


def _timing(header: str | None) -> dict[str, float]:
    parts = {}
    for item in (header or "").split(","):
        name, _, rest = item.strip().partition(";")
        if rest.startswith("dur="):
            parts[name] = float(rest[4:]) / 1000
        elif rest.startswith("desc="):
            parts[name] = float(rest[5:].strip('"'))
    return parts


async def _closed_loop(
    url: str, bodies: list[dict], concurrency: int, seconds: float, warmup_s: float
) -> dict:
    import aiohttp

    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup_s
    stop = measure_from + seconds
    latencies, features, model, batches = [], [], [], []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers={"X-API-Key": KEY}) as session:

        async def worker(w: int) -> None:
            n = w
            while loop.time() < stop:
                body = bodies[n % len(bodies)]
                n += concurrency
                record = loop.time() >= measure_from
                started = time.perf_counter()
                try:
                    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
                        await r.read()
                        status, header = r.status, r.headers.get("Server-Timing")
                except Exception as exc:  # noqa: BLE001 - every failure counts as an error
                    status, header = -1, None
                    errors.append(repr(exc))
                elapsed = time.perf_counter() - started
                if not record:
                    continue
                if status != 200:
                    errors.append(str(status))
                    continue
                timing = _timing(header)
                latencies.append(elapsed)
                features.append(timing.get("features", 0.0))
                model.append(timing.get("model", 0.0))
                batches.append(timing.get("batch", 1.0))

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    lat, feat, mod = (np.asarray(a) for a in (latencies, features, model))
    rest = lat - feat - mod
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "throughput_rps": len(latencies) / seconds,
        **_pct(lat),
        "mean_ms": float(lat.mean() * 1000),
        "features_p50_ms": float(np.percentile(feat, 50) * 1000),
        "model_p50_ms": float(np.percentile(mod, 50) * 1000),
        "rest_p50_ms": float(np.percentile(rest, 50) * 1000),
        "features_mean_ms": float(feat.mean() * 1000),
        "model_mean_ms": float(mod.mean() * 1000),
        "rest_mean_ms": float(rest.mean() * 1000),
        "mean_batch": float(np.mean(batches)),
        "_latencies_ms": lat * 1000,  # for pooling rounds (not written to the JSON)
    }


def pooled_log_cost(latencies: dict[tuple[bool, int], np.ndarray], resamples: int = 2000) -> dict:
    """The prediction log's cost from rounds of the same load with the log off and on: the p99 of every
    request of each mode pooled over the rounds, their ratio, and a 95% interval of that ratio from
    resampling whole rounds (each round's off and on together: the machine's noise varies by round)."""
    from scipy import stats

    rounds = sorted({r for _, r in latencies})

    def ratio(picked) -> float:
        picked = np.asarray(picked, dtype=int)
        on = np.concatenate([latencies[(True, rounds[i])] for i in picked])
        off = np.concatenate([latencies[(False, rounds[i])] for i in picked])
        return float(np.percentile(on, 99) / np.percentile(off, 99))

    interval = stats.bootstrap(
        (np.arange(len(rounds)),), ratio, vectorized=False, n_resamples=resamples, method="percentile",
        random_state=np.random.default_rng(0),
    ).confidence_interval  # fmt: skip
    pooled = {
        on: np.concatenate([v for (mode, _), v in latencies.items() if mode == on]) for on in (False, True)
    }
    return {
        "rounds": len(rounds),
        "p99_off_ms": float(np.percentile(pooled[False], 99)),
        "p99_on_ms": float(np.percentile(pooled[True], 99)),
        "requests_off": int(len(pooled[False])),
        "requests_on": int(len(pooled[True])),
        "ratio": ratio(range(len(rounds))),
        "ratio_lo": float(interval.low),
        "ratio_hi": float(interval.high),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=Path, default=SAMPLE, help="Taobao CSV of the world")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--floor-calls", type=int, default=500)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1], help="@serve.batch sizes")
    parser.add_argument("--layouts", nargs="+", default=["combined", "split"], help="serving.layout values")
    parser.add_argument("--log-rounds", type=int, default=3, help="off/on rounds of the prediction log")
    parser.add_argument("--only-log", action="store_true", help="only the prediction log's cost (4.)")
    # rolled 12x as often as the default (60 s), so that most conversions to parquet run inside the
    # measured rounds with the log on (the switch to off rolls the rest, outside both): a dearer log
    parser.add_argument("--log-roll-s", type=float, default=5.0, help="serving.prediction_log_roll_s")
    args = parser.parse_args()

    import pandas as pd
    import ray
    from ray import serve

    from shopsight.features import store
    from shopsight.features.build import build_features
    from shopsight.platform import load_settings
    from shopsight.platform.api_keys import hash_key
    from shopsight.platform.mlflow_server import stop_local_server
    from shopsight.serving.deploy import deploy

    machine = describe_machine()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    port = _free_port()
    settings = load_settings(
        overrides={
            "data_dir": str(tmp / "dd"),
            "spark.master": "local[2]",
            "spark.shuffle_partitions": "4",
            "mlflow.port": str(_free_port()),
            "serving.port": str(port),
            "serving.api_keys.bench": hash_key(KEY),
            "serving.prediction_log_roll_s": str(args.log_roll_s),
        },
        environ={},
    ).settings
    settings.data_dir.mkdir(parents=True)
    shutil.copy(args.events, settings.data_dir / "events.csv")
    started_ray = False
    try:
        t0 = time.perf_counter()
        build_features(settings, settings.data_dir / "events.csv", START, END)
        store.apply(settings)
        store.materialize(settings)
        versions = _register(settings, tmp)
        print(f"world ready in {time.perf_counter() - t0:.0f} s: models {versions}")
        online = store.online_features(
            settings,
            "next_item_v1",
            [{"user_id": int(u)} for u in pd.read_csv(args.events, header=None)[0].unique()],
        )
        users = [u for u, n in zip(online["user_id"], online["seq_length"], strict=True) if n == 50]
        print(f"{len(users)} users with a 50-item history")
        floors = {} if args.only_log else _floors(settings, users, args.floor_calls)
        floors.update(_log_write_floor(tmp, args.floor_calls))
        for name, value in floors.items():
            print(f"floor {name}: p50 {value['p50_ms']:.2f} ms, p99 {value['p99_ms']:.2f} ms")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        started_ray = True
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(_echo_app(), name="echo", route_prefix="/echo")
        for concurrency in () if args.only_log else (1, 8):
            echo = asyncio.run(
                _closed_loop(
                    f"http://127.0.0.1:{port}/echo/", [{"user_id": users[0], "k": 10}], concurrency,
                    args.seconds, args.warmup,
                )
            )  # fmt: skip
            echo.pop("_latencies_ms")
            floors[f"Ray Serve HTTP echo, no work (c={concurrency})"] = echo
            print(
                f"floor Serve echo c={concurrency}: p50 {echo['p50_ms']:.2f} ms, p99 {echo['p99_ms']:.2f} ms"
            )
        serve.delete("echo")
        endpoints = {
            "recommendations": ("/v1/recommendations", [{"user_id": u, "k": 10} for u in users]),
            "purchase-propensity": ("/v1/purchase-propensity", [{"user_ids": [u]} for u in users]),
        }
        runs, logging_rounds = [], []
        for layout in [] if args.only_log else args.layouts:
            laid_out = settings.model_copy(
                update={"serving": settings.serving.model_copy(update={"layout": layout})}
            )
            deployed = deploy(laid_out)
            sizes = args.batch_sizes if layout == args.layouts[0] else args.batch_sizes[:1]
            for batch_size in sizes:
                deploy(laid_out, max_batch_size=batch_size)  # in place: the replicas are kept
                for endpoint, (path, bodies) in endpoints.items():
                    for concurrency in args.concurrency:
                        result = asyncio.run(
                            _closed_loop(deployed.url + path, bodies, concurrency, args.seconds, args.warmup)
                        )
                        result.pop("_latencies_ms")
                        result.update(
                            endpoint=endpoint,
                            concurrency=concurrency,
                            max_batch_size=batch_size,
                            layout=layout,
                        )
                        runs.append(result)
                        print(
                            f"{layout} {endpoint} batch<={batch_size} c={concurrency}: "
                            f"{result['throughput_rps']:.0f} req/s, p50 {result['p50_ms']:.1f} ms, "
                            f"p99 {result['p99_ms']:.1f} ms, errors {result['errors']}, features "
                            f"{result['features_p50_ms']:.2f} / model {result['model_p50_ms']:.2f} / rest "
                            f"{result['rest_p50_ms']:.2f} ms (p50), mean batch {result['mean_batch']:.1f}"
                        )
        laid_out = settings.model_copy(
            update={"serving": settings.serving.model_copy(update={"layout": args.layouts[0]})}
        )
        deployed = deploy(laid_out, max_batch_size=args.batch_sizes[0])
        pooled_latencies: dict[str, dict] = {}
        for round_number in range(args.log_rounds):
            for logging in (False, True) if round_number % 2 == 0 else (True, False):
                deploy(laid_out, max_batch_size=args.batch_sizes[0], prediction_log=logging)
                for endpoint, (path, bodies) in endpoints.items():
                    result = asyncio.run(
                        _closed_loop(deployed.url + path, bodies, 8, args.seconds, args.warmup)
                    )
                    result.update(endpoint=endpoint, logging=logging, round=round_number)
                    pooled_latencies.setdefault(endpoint, {})[(logging, round_number)] = result.pop(
                        "_latencies_ms"
                    )
                    logging_rounds.append(result)
                    print(
                        f"prediction log {'on ' if logging else 'off'} round {round_number} {endpoint} c=8: "
                        f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, errors {result['errors']}"
                    )
        logged = sum(1 for _ in (settings.data_dir / "prediction-spool").glob("*.msgpack"))
        print(f"prediction log: {logged} spool segments open at the end")
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        stop_local_server(settings)
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    report = {
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "users_with_50_items": len(users),
        "batch_wait_timeout_s": settings.serving.batch_wait_timeout_s,
        "prediction_log_roll_s": settings.serving.prediction_log_roll_s,
        "floors": floors,
        "runs": runs,
        "prediction_log_rounds": logging_rounds,
        "prediction_log_pooled": {e: pooled_log_cost(v) for e, v in pooled_latencies.items() if len(v) >= 4},
        "target": {"p99_ms": TARGET_P99_MS, "endpoint": "recommendations", "concurrency": 8},
    }
    stamp = machine["date"][:10]
    name = "serving-log" if args.only_log else "serving"  # a log-only run keeps the day's full run
    (RESULTS / f"{name}-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    _markdown(report)
    total_errors = sum(r["errors"] for r in runs + logging_rounds)
    if total_errors:
        raise SystemExit(f"{total_errors} requests failed")


def _markdown(report: dict) -> None:
    machine = report["machine"]
    before, after = report["load_average_before"], report["load_average_after"]
    lines = [
        f"\n## {machine['date']}: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}, Python {machine['python']}\n",
        f"Load average (1/5/15 min) before {before[0]:.1f}/{before[1]:.1f}/{before[2]:.1f}, after "
        f"{after[0]:.1f}/{after[1]:.1f}/{after[2]:.1f}. Ray local, 2 CPUs; combined layout: one replica "
        "(API + both models, 1 CPU, 1 torch thread); split: ingress (unreserved) + one replica per model (1 CPU "
        "each); client (asyncio + aiohttp) on the same 2 cores. "
        f"{report['users_with_50_items']} users with a 50-item history, k=10; propensity: 1 user per request. "
        f"@serve.batch wait {report['batch_wait_timeout_s'] * 1000:g} ms (batch_wait_timeout_s).\n",
        "Floors (same run; in process, one thread; the Serve echo over HTTP), p50 / p99 ms:\n",
        "| what | p50 ms | p99 ms |",
        "| --- | ---: | ---: |",
    ]
    for name, value in report["floors"].items():
        lines.append(f"| {name} | {value['p50_ms']:.3f} | {value['p99_ms']:.3f} |")
    if report["runs"]:
        lines += [
            "\nOver HTTP (closed loop, c requests in flight). Breakdown p50 from Server-Timing: features and model "
            "are the times of the batch the request was scored in; rest = latency - both (HTTP, proxy, ingress, Ray "
            "calls, batch wait, queueing):\n",
            "| layout | endpoint | @serve.batch max | concurrency | requests | errors | req/s | p50 ms | p99 ms | features ms | model ms | rest ms | mean batch |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for r in report["runs"]:
        lines.append(
            f"| {r['layout']} | {r['endpoint']} | {r['max_batch_size']} | {r['concurrency']} | {r['requests']:,} | {r['errors']} | "
            f"{r['throughput_rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['features_p50_ms']:.2f} | "
            f"{r['model_p50_ms']:.2f} | {r['rest_p50_ms']:.2f} | {r['mean_batch']:.1f} |"
        )
    candidates = [r for r in report["runs"] if r["endpoint"] == "recommendations" and r["concurrency"] == 8]
    target = min(candidates, key=lambda r: r["p99_ms"]) if candidates else None
    if target is not None:
        met = "met" if target["p99_ms"] <= TARGET_P99_MS and target["errors"] == 0 else "NOT met"
        lines.append(
            f"\nTarget (recommendation, concurrency 8, 50-item history: p99 <= {TARGET_P99_MS:.0f} ms, zero errors): "
            f"{met}; best: {target['layout']} layout, @serve.batch max {target['max_batch_size']} (p99 {target['p99_ms']:.1f} ms, "
            f"{target['errors']} errors)."
        )
    rounds = report["prediction_log_rounds"]
    if rounds:
        lines += [
            "\nThe prediction log's cost (concurrency 8, @serve.batch on; off and on alternating, "
            f"{max(r['round'] for r in rounds) + 1} rounds each; the spool rolled every "
            f"{report['prediction_log_roll_s']:g} s; the median of the rounds' p99; target: on <= 1.05 x off):\n",
            "| endpoint | p99 off ms | p99 on ms | on / off | p50 off ms | p50 on ms | requests off | requests on |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for endpoint in dict.fromkeys(r["endpoint"] for r in rounds):
            mode = {
                on: [r for r in rounds if r["endpoint"] == endpoint and r["logging"] == on]
                for on in (False, True)
            }
            p99 = {on: float(np.median([r["p99_ms"] for r in mode[on]])) for on in mode}
            p50 = {on: float(np.median([r["p50_ms"] for r in mode[on]])) for on in mode}
            n = {on: sum(r["requests"] for r in mode[on]) for on in mode}
            lines.append(
                f"| {endpoint} | {p99[False]:.1f} | {p99[True]:.1f} | {p99[True] / p99[False]:.3f} | {p50[False]:.1f} | "
                f"{p50[True]:.1f} | {n[False]:,} | {n[True]:,} |"
            )
    pooled = report.get("prediction_log_pooled") or {}
    if pooled:
        lines += [
            "\nPooled: the p99 of every request of each mode over all rounds, and a 95% interval of on / off "
            "from resampling whole rounds (scipy's bootstrap, 2,000 resamples):\n",
            "| endpoint | rounds | p99 off ms | p99 on ms | on / off | 95% interval | requests off | requests on |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        for endpoint, p in pooled.items():
            lines.append(
                f"| {endpoint} | {p['rounds']} | {p['p99_off_ms']:.1f} | {p['p99_on_ms']:.1f} | {p['ratio']:.3f} | "
                f"{p['ratio_lo']:.3f} - {p['ratio_hi']:.3f} | {p['requests_off']:,} | {p['requests_on']:,} |"
            )
    append_report(RESULTS / "serving.md", "Serving benchmarks", "python -m benchmarks.bench_serving", lines)


if __name__ == "__main__":
    main()
