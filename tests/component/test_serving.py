"""Serving for real: Ray Serve over HTTP, a real MLflow server and registry, Feast's Redis online store (a
real redis-server with a password, as the cluster's) over the Taobao sample's features. Responses equal the
registered pyfuncs' offline predictions; a promotion under load drops nothing; canary and shadow routing;
auth, fallback, 4xx; schemathesis. Last, two chaos cases (marked ``chaos``, recorded in
benchmarks/results/chaos.md): Redis killed under load, a model replica killed under load; both leave the
world as they found it."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import numpy as np
import pandas as pd
import pytest
import requests

from shopsight.features import store
from shopsight.platform.api_keys import hash_key
from shopsight.serving.prediction_log import read_predictions

pytestmark = [
    pytest.mark.serve,
    pytest.mark.ray,
    pytest.mark.mlflow,
    pytest.mark.feast,
    pytest.mark.spark,
    pytest.mark.slow,
]

NEXT, PURCHASE, CHURN = "shopsight-next-item", "shopsight-purchase", "shopsight-churn"
KEY = "component-test-key"
AUTH = {"X-API-Key": KEY}
METRICS_INTERVAL_MS = 1000
SWITCH_LIMIT_S = 30
REDIS_DB = 2  # of the session's Redis: test_feature_store uses 0, test_cluster_services 1


def _train_next_item(split, seed: int, epochs: int):
    import torch

    from shopsight.training.models import build_model
    from shopsight.training.next_item.fit import train_next_item
    from shopsight.training.runtime.loop import LoopConfig

    torch.manual_seed(seed)
    model = build_model(
        "sasrec", n_items=split.n_items, max_len=50, d_model=16, n_heads=1, n_blocks=1, dropout=0.1
    )
    cfg = LoopConfig(epochs=epochs, batch_size=64, lr=5e-3, eval_every=epochs, seed=seed, eval_users=50)
    train_next_item(model, split, cfg, log=lambda _: None)
    return model.eval()


def _register_next_item(settings, sequences, split, tmp, seed, epochs) -> str:
    import mlflow

    from shopsight.training.next_item.pyfunc import log_next_item_model, save_model_dir

    model = _train_next_item(split, seed, epochs)
    folder = save_model_dir(tmp / f"next_item_{seed}", "sasrec", model, sequences.item_ids)
    example = pd.DataFrame({"item_ids": [sequences.item_ids[sequences.sequences[0][-5:]].tolist()]})
    with mlflow.start_run(run_name=f"serving-test-next-item-{seed}"):
        info = log_next_item_model(folder, example, registered_name=NEXT)
    return str(info.registered_model_version)


def _register_snapshot_model(settings, tmp, task_name: str, shuffled: bool = False) -> str:
    """A model of a task on user snapshots (purchase, churn), calibrated on its rows, registered;
    ``shuffled``: trained on labels shuffled across rows, so that it learns nothing (a bad challenger)."""
    import mlflow
    import torch

    from shopsight.training.binary.calibration import Calibration
    from shopsight.training.binary.data import SnapshotFeatures
    from shopsight.training.binary.fit import predict_probabilities, train_binary
    from shopsight.training.binary.pyfunc import input_example, log_snapshot_model, save_model_dir
    from shopsight.training.models import build_model
    from shopsight.training.runtime.loop import LoopConfig
    from shopsight.training.tasks import get_task

    task = get_task(task_name)
    path, _ = store.training_set(
        settings,
        task.data.source,
        date(2017, 11, 25),
        date(2017, 12, 1),
        tmp / f"training_set_{task.name}.parquet",
        label=task.data.label,
    )
    frame = pd.read_parquet(path)
    if shuffled:
        frame[task.data.label] = frame[task.data.label].sample(frac=1, random_state=1).to_numpy()
    features = SnapshotFeatures.fit(frame)
    torch.manual_seed(0)
    model = build_model(
        "sasrec", n_items=features.n_items, n_dense=features.n_dense, n_categories=features.n_categories,
        d_model=16, n_heads=1, n_blocks=1, dropout=0.1,
    )  # fmt: skip
    tensors = features.transform(frame)
    calibration = None
    if len(np.unique(tensors.labels)) == 2:
        train_binary(
            model, tensors, tensors, LoopConfig(epochs=2, batch_size=128, eval_every=1), log=lambda _: None
        )
        calibration = Calibration.fit(predict_probabilities(model, tensors), tensors.labels, "platt")
    folder = save_model_dir(tmp / task.name, "sasrec", model.eval(), features, calibration)
    with mlflow.start_run(run_name=f"serving-test-{task.name}"):
        info = log_snapshot_model(folder, input_example(frame.head(5)), registered_name=task.registered_model)
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def world(taobao_features, taobao_sample, make_settings, free_port, tmp_path_factory, redis_server):
    """Feast applied and materialised (online store: the session's Redis, its password from a file, as in
    the cluster), MLflow with two next-item versions (champion v1, challenger v2) and a purchase champion,
    and the serving application deployed on a free loopback port."""
    import mlflow
    import ray
    from mlflow import MlflowClient
    from ray import serve

    from shopsight.platform.mlflow_server import stop_local_server, tracking_uri
    from shopsight.serving.deploy import deploy
    from shopsight.training.next_item.data import LeaveOneOut, SequenceData

    base, _ = taobao_features
    tmp = tmp_path_factory.mktemp("serving")
    (tmp / "features").symlink_to(base.data_dir.absolute() / "features")
    port = free_port()
    password = tmp / "redis-password"
    password.write_text(redis_server.password)
    password.chmod(0o600)
    settings = make_settings(
        tmp,
        **{
            "feast.online_store": "redis",
            "feast.redis_url": f"redis://{redis_server.host}:{redis_server.port}/{REDIS_DB}",
            "feast.redis_password_file": str(password),
            "mlflow.port": str(free_port()),
            "serving.port": str(port),
            "serving.poll_interval_s": "1",
            "serving.num_cpus": "0.5",
            "serving.api_keys.team_a": hash_key(KEY),
            "serving.max_user_ids": "20",
            "serving.prediction_log_roll_s": "1",
        },
    )
    started_ray = False
    try:
        store.apply(settings)
        store.materialize(settings)
        mlflow.set_tracking_uri(tracking_uri(settings))
        mlflow.set_experiment("serving-test")
        sequences = SequenceData.from_file(taobao_sample)
        split = LeaveOneOut.split(sequences)
        v1 = _register_next_item(settings, sequences, split, tmp, seed=0, epochs=3)
        v2 = _register_next_item(settings, sequences, split, tmp, seed=1, epochs=1)
        purchase = _register_snapshot_model(settings, tmp, "purchase")
        churn = _register_snapshot_model(settings, tmp, "churn")
        client = MlflowClient(tracking_uri(settings))
        client.set_registered_model_alias(NEXT, "champion", v1)
        client.set_registered_model_alias(NEXT, "challenger", v2)
        client.set_registered_model_alias(PURCHASE, "champion", purchase)
        client.set_registered_model_alias(CHURN, "champion", churn)
        if not ray.is_initialized():
            # logical CPUs: room for the split layout with two replicas of each model (0.5 CPU each)
            # Ray exports the replicas' metrics every second (10 s by default), which /metrics sums
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     _system_config={"metrics_report_interval_ms": METRICS_INTERVAL_MS})  # fmt: skip
            started_ray = True
        deployed = deploy(settings)
        yield {
            "settings": settings,
            "url": deployed.url,
            "v1": v1,
            "v2": v2,
            "purchase": purchase,
            "churn": churn,
            "client": client,
        }
    finally:
        if ray.is_initialized():
            serve.shutdown()
            if started_ray:
                ray.shutdown()
        stop_local_server(settings)


def _post(world, path, body, headers=AUTH, timeout=30):
    return requests.post(world["url"] + path, json=body, headers=headers, timeout=timeout)


def _users(world, n=12) -> list[int]:
    online = store.online_features(
        world["settings"], "next_item_v1", [{"user_id": u} for u in _all_users(world)]
    )
    with_history = [u for u, seq in zip(online["user_id"], online["seq_item_ids"], strict=True) if seq]
    return sorted(with_history)[:n]


def _all_users(world) -> list[int]:
    frame = pd.read_parquet(world["settings"].data_dir.absolute() / "features" / "user_sequence")
    return sorted(frame.user_id.unique().tolist())


def _models(world) -> dict:
    response = requests.get(world["url"] + "/v1/models", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _settled_metrics(world, timeout_s=30) -> str:
    """``/metrics`` once two reads a report interval apart agree (ignoring the reads' own counts): what the
    replicas recorded reaches Ray's export within one interval, so a read right after requests may lag."""
    deadline = time.time() + timeout_s
    previous = None
    while time.time() < deadline:
        text = requests.get(world["url"] + "/metrics", headers=AUTH, timeout=10).text
        counted = [line for line in text.splitlines() if 'endpoint="/metrics"' not in line]
        if counted == previous:
            return text
        previous = counted
        time.sleep(1.5 * METRICS_INTERVAL_MS / 1000)
    raise AssertionError(f"/metrics did not settle in {timeout_s} s")


def _wait_for(predicate, timeout_s=60, what="condition"):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_recommendations_equal_the_registered_pyfunc_offline(world):
    import mlflow

    users = _users(world)
    assert len(users) >= 8
    online = store.online_features(world["settings"], "next_item_v1", [{"user_id": u} for u in users])
    offline = mlflow.pyfunc.load_model(f"models:/{NEXT}/{world['v1']}")
    expected = offline.predict(pd.DataFrame({"item_ids": online["seq_item_ids"]}), params={"k": 10})
    for n, user in enumerate(users):
        response = _post(world, "/v1/recommendations", {"user_id": user, "k": 10})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": NEXT, "version": world["v1"], "alias": "champion"}
        assert not body["fallback"] and body["source"] == "model"
        assert [i["item_id"] for i in body["items"]] == expected["items"][n]
        assert np.allclose([i["score"] for i in body["items"]], expected["scores"][n], atol=1e-4)
        assert "features;dur=" in response.headers["Server-Timing"]


@pytest.mark.parametrize("task_name", ["purchase", "churn"])
def test_probabilities_equal_the_registered_pyfunc_offline(world, task_name):
    """Every task on user snapshots is served from its table entry: its route, its feature service, its
    registered model; the answer is the registered pyfunc's calibrated probability."""
    import mlflow

    from shopsight.training.tasks import get_task

    task = get_task(task_name)
    users = _users(world, n=10)
    response = _post(world, task.route.path, {"user_ids": users})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": task.registered_model, "version": world[task_name], "alias": "champion"}
    online = store.online_features(world["settings"], task.route.service, [{"user_id": u} for u in users])
    frame = pd.DataFrame(online)
    frame["event_timestamp"] = pd.Timestamp(body["as_of"]).tz_convert("UTC").tz_localize(None)
    offline = mlflow.pyfunc.load_model(f"models:/{task.registered_model}/{world[task_name]}")
    # the online store's rows go in as Feast returns them (int64), no casts
    expected = offline.predict(frame)["probability"].to_numpy()
    got = body["predictions"]
    assert [p["user_id"] for p in got] == users and all(p["has_history"] for p in got)
    assert np.allclose([p["probability"] for p in got], expected, atol=1e-6)


def test_a_user_without_history_gets_the_popularity_fallback(world):
    response = _post(world, "/v1/recommendations", {"user_id": 10**12, "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fallback"] and body["source"] == "popularity" and len(body["items"]) == 5
    assert body["model"]["version"] == world["v1"]
    # popularity = each item's latest item_stats row online: its events in the last 7 days
    stats = pd.read_parquet(world["settings"].data_dir.absolute() / "features" / "item_stats")
    latest = stats.sort_values("snapshot_ts").groupby("item_id").tail(1)
    events = latest[[f"n_{b}_7d" for b in ("pv", "buy", "cart", "fav")]].sum(axis=1)
    assert [i["score"] for i in body["items"]] == sorted(events.tolist(), reverse=True)[:5]
    propensity = _post(world, "/v1/purchase-propensity", {"user_ids": [10**12]}).json()
    assert propensity["predictions"][0]["has_history"] is False


def test_api_keys_and_open_health(world):
    url = world["url"]
    body = {"user_id": 1, "k": 3}
    assert requests.post(url + "/v1/recommendations", json=body, timeout=10).status_code == 401
    wrong = requests.post(url + "/v1/recommendations", json=body, headers={"X-API-Key": "x"}, timeout=10)
    assert wrong.status_code == 401 and "wrong API key" in wrong.json()["error"]
    bearer = requests.post(url + "/v1/recommendations", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200
    health = requests.get(url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["models"] == {NEXT: world["v1"], PURCHASE: world["purchase"], CHURN: world["churn"]}
    assert requests.get(url + "/docs", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "raw", "status"),
    [
        ("POST", "/v1/recommendations", b'{"user_id": 1', 422),
        ("POST", "/v1/recommendations", b'{"user_id": "one"}', 422),
        ("POST", "/v1/recommendations", b'{"user_id": 1, "k": 0}', 422),
        ("POST", "/v1/recommendations", b'{"user_id": 1, "k": 101}', 422),
        ("POST", "/v1/purchase-propensity", b'{"user_ids": ' + str(list(range(21))).encode() + b"}", 422),
        ("POST", "/v1/purchase-propensity", b'{"user_ids": []}', 422),
        ("GET", "/v1/unknown", b"", 404),
        ("GET", "/unknown", b"", 404),
        ("DELETE", "/v1/models", b"", 405),
    ],
)
def test_bad_requests_are_4xx_with_a_message(world, method, path, raw, status):
    headers = {**AUTH, "Content-Type": "application/json"}
    response = requests.request(method, world["url"] + path, data=raw, headers=headers, timeout=10)
    assert response.status_code == status, response.text
    body = response.json()
    assert body.get("error") or body.get("detail")


def test_models_status_and_metrics_name_the_served_versions(world):
    from shopsight.serving.deploy import status

    models = _models(world)
    assert models["next_item"]["champion"]["version"] == world["v1"]
    assert models["next_item"]["challenger"] is None  # no canary, no shadow: not loaded
    assert models["purchase"]["champion"]["version"] == world["purchase"]
    assert models["churn"]["champion"]["version"] == world["churn"]
    info = status(world["settings"])
    assert info["status"] == "RUNNING" and set(info["deployments"]) == {"api"}  # the combined layout
    assert info["served"]["next_item"]["champion"]["version"] == world["v1"]
    metrics = _settled_metrics(world)
    assert (
        _metric(metrics, "shopsight_served_version", model=NEXT, alias="champion", version=world["v1"]) == 1
    )
    assert _metric(metrics, "shopsight_fallbacks_total", endpoint="/v1/recommendations") >= 1
    assert _metric(metrics, "shopsight_request_latency_seconds_count", endpoint="/v1/recommendations") >= 10


def _versions_of(world, users, n):
    versions = []
    for k in range(n):
        response = _post(world, "/v1/recommendations", {"user_id": users[k % len(users)], "k": 5})
        assert response.status_code == 200, response.text
        versions.append(response.json()["model"]["version"])
    return versions


def test_canary_share_within_tolerance(world):
    from shopsight.serving.deploy import deploy

    deploy(world["settings"], canary_share=0.3, routing_seed=11)  # in place: user_config only
    _wait_for(lambda: (_models(world)["next_item"]["challenger"] or {}).get("version") == world["v2"],
              what="the challenger to load")  # fmt: skip
    users = _users(world)
    versions = _versions_of(world, users, 300)
    share = versions.count(world["v2"]) / len(versions)
    assert abs(share - 0.3) < 0.09, share  # 3.4 standard deviations of 300 draws
    assert set(versions) == {world["v1"], world["v2"]}


def test_shadow_scoring_never_changes_responses(world):
    from shopsight.serving.deploy import deploy

    users = _users(world, n=8)
    deploy(world["settings"])  # routing back to the settings: no canary, no shadow
    _wait_for(lambda: _models(world)["next_item"]["challenger"] is None, what="the challenger to unload")
    plain = [_post(world, "/v1/recommendations", {"user_id": u, "k": 10}).json() for u in users]
    deploy(world["settings"], shadow=True)
    _wait_for(lambda: (_models(world)["next_item"]["challenger"] or {}).get("version") == world["v2"],
              what="the shadow challenger to load")  # fmt: skip
    shadowed = [_post(world, "/v1/recommendations", {"user_id": u, "k": 10}).json() for u in users]
    assert shadowed == plain
    metrics = _settled_metrics(world)
    assert _metric(metrics, "shopsight_shadow_comparisons_total", endpoint="/v1/recommendations") >= len(
        users
    )
    deploy(world["settings"])


def test_promotion_under_load_drops_nothing_and_switches_within_30s(world):
    users = _users(world)
    seen: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def hammer():
        session = requests.Session()
        n = 0
        while not stop.is_set():
            try:
                r = session.post(
                    world["url"] + "/v1/recommendations",
                    json={"user_id": users[n % len(users)], "k": 5},
                    headers=AUTH,
                    timeout=30,
                )
                version = r.json()["model"]["version"] if r.status_code == 200 else None
                seen.append((time.time(), r.status_code, version))
            except requests.RequestException as exc:
                seen.append((time.time(), -1, repr(exc)))
            n += 1

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    promoted_at = time.time()
    world["client"].set_registered_model_alias(NEXT, "champion", world["v2"])
    try:
        _wait_for(lambda: any(v == world["v2"] and t > promoted_at for t, _, v in seen[-50:]),
                  timeout_s=SWITCH_LIMIT_S, what=f"version {world['v2']} to answer")  # fmt: skip
        time.sleep(2)  # keep sending after the switch
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    errors = [(status, v) for _, status, v in seen if status != 200]
    assert not errors, errors[:5]
    first_new = min(t for t, _, v in seen if v == world["v2"])
    assert first_new - promoted_at < SWITCH_LIMIT_S
    assert not [v for t, _, v in seen if t > first_new + 0.5 and v != world["v2"]]  # no way back
    assert len(seen) > 50
    assert _models(world)["next_item"]["champion"]["version"] == world["v2"]


def test_schemathesis_against_the_live_openapi_spec_finds_no_5xx(world):
    from tests.unit.test_serving_core import fuzz

    statuses = fuzz(
        lambda case: case.call(base_url=world["url"], headers=AUTH, timeout=30),
        schema_url=world["url"] + "/openapi.json",
        examples=12,
    )
    assert 200 in statuses and 422 in statuses


def test_split_layout_answers_the_same(world):
    """The ingress and one deployment per model: the same answers, one Ray call more."""
    from shopsight.serving.deploy import deploy, status

    users = _users(world, n=4)
    before = [_post(world, "/v1/recommendations", {"user_id": u, "k": 5}).json()["items"] for u in users]
    settings = world["settings"]
    split = settings.model_copy(update={"serving": settings.serving.model_copy(update={"layout": "split"})})
    deploy(split)
    info = status(split)
    assert set(info["deployments"]) == {"api", "next_item", "purchase", "churn"}
    assert info["served"]["next_item"]["champion"]["version"] == world["v2"]  # promoted above
    after = [_post(world, "/v1/recommendations", {"user_id": u, "k": 5}).json()["items"] for u in users]
    assert after == before
    response = _post(world, "/v1/purchase-propensity", {"user_ids": users})
    assert response.status_code == 200 and response.json()["model"]["version"] == world["purchase"]
    response = _post(world, "/v1/churn-risk", {"user_ids": users})
    assert response.status_code == 200 and response.json()["model"]["version"] == world["churn"]


# ---------------------------------------------------------------------------------------------- chaos

CONCURRENCY = 4


class _Load:
    """``CONCURRENCY`` clients sending ``calls`` ((path, body), round robin) back to back until the block
    ends; ``seen`` holds (sent, answered, path, status, body) per request: status -1 and the error for a
    request that got no HTTP answer (connection refused or reset, timeout)."""

    def __init__(self, world, calls: list[tuple[str, dict]]) -> None:
        self.url, self.calls = world["url"], calls
        self.seen: list[tuple[float, float, str, int, object]] = []
        self.answered_ids: list[tuple[str, str]] = []  # (path, X-Request-Id) of every 200
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CONCURRENCY)
        ]

    def _client(self, first: int) -> None:
        session = requests.Session()
        n = first
        while not self._stop.is_set():
            path, body = self.calls[n % len(self.calls)]
            sent = time.time()
            try:
                r = session.post(self.url + path, json=body, headers=AUTH, timeout=30)
                try:
                    answer = r.json()
                except ValueError:
                    answer = r.text[:200]
                self.seen.append((sent, time.time(), path, r.status_code, answer))
                if r.status_code == 200:
                    self.answered_ids.append((path, r.headers["x-request-id"]))
            except requests.RequestException as exc:
                self.seen.append((sent, time.time(), path, -1, repr(exc)))
            n += 1

    def sent_after(self, at: float) -> list:
        return [s for s in list(self.seen) if s[0] >= at]

    def failed(self) -> list:
        return [(path, status, body) for _, _, path, status, body in self.seen if status != 200]

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=40)


def _uses_features(path: str, body: dict) -> bool:
    if path == "/v1/recommendations":
        return body["source"] == "model" and not body["fallback"] and not body["features_unavailable"]
    return all(p["has_history"] for p in body["predictions"]) and not body["features_unavailable"]


def _named_fallback(path: str, body: dict) -> bool:
    """An answer without features that says so: the fallback, and why."""
    if not body["features_unavailable"]:
        return False
    if path == "/v1/recommendations":
        return body["fallback"] and body["source"] == "popularity" and len(body["items"]) == 5
    return not any(p["has_history"] for p in body["predictions"])


def _served_since(world) -> dict:
    """When each served model version was loaded: a restarted replica loads its models again."""
    return {task: served["champion"]["loaded_at"] for task, served in _models(world).items()}


@pytest.mark.chaos
def test_redis_killed_under_load_answers_named_fallbacks_then_features_again(world, redis_server, record):
    """The online store's Redis killed (SIGKILL) while 4 clients send requests: every request is still
    answered (200, never a 5xx), as a fallback that says the features were unavailable, and counted; Redis
    back (on the same port, with the same password, empty) and the online store materialised again, the
    answers use features again, from the same replicas: nothing restarted."""
    users = _users(world, n=8)
    calls = [("/v1/recommendations", {"user_id": u, "k": 5}) for u in users]
    calls.insert(4, ("/v1/purchase-propensity", {"user_ids": users[:4]}))
    loaded = _served_since(world)
    before = _settled_metrics(world)
    restarted_at = materialised_at = None
    try:
        with _Load(world, calls) as load:
            _wait_for(lambda: len(load.seen) >= 20, timeout_s=30, what="answers before the fault")
            redis_server.kill()
            killed_at = time.time()
            _wait_for(lambda: len(load.sent_after(killed_at)) >= 40, timeout_s=30,
                      what="answers while Redis is down")  # fmt: skip
            restarted_at = time.time()
            redis_server.start()
            store.materialize(world["settings"])
            materialised_at = time.time()
            _wait_for(lambda: len(load.sent_after(materialised_at)) >= 20, timeout_s=30,
                      what="answers after the online store is back")  # fmt: skip
    finally:  # the world's online store back for the tests that follow, whatever happened
        if not redis_server.running:
            redis_server.start()
        if materialised_at is None:
            store.materialize(world["settings"])
    seen = load.seen
    failed = load.failed()
    outage = [(path, body) for sent, done, path, status, body in seen
              if status == 200 and sent >= killed_at and done <= restarted_at]  # fmt: skip
    fallbacks = [body for *_, status, body in seen if status == 200 and body["features_unavailable"]]
    back = [(path, body) for sent, _, path, status, body in seen if status == 200 and sent >= materialised_at]
    # recovered: from Redis restarted to the first answer with features (materialisation included)
    first_back = min((done for sent, done, path, status, body in seen
                      if sent >= restarted_at and status == 200 and _uses_features(path, body)),
                     default=time.time())  # fmt: skip
    recovered_in = first_back - restarted_at
    record(
        in_flight=f"{len(seen)} requests at concurrency {CONCURRENCY}, {len(outage)} while Redis was down",
        lost=len(failed),
        recovered=len(fallbacks),
        seconds_to_recover=round(recovered_in, 1),
    )
    assert not failed, failed[:5]
    assert len(outage) >= 30 and all(_named_fallback(path, body) for path, body in outage)
    # and promptly: a read of a Redis that is down fails at once (no retries with seconds of backoff)
    slowest = max(done - sent for sent, done, *_ in seen if sent >= killed_at and done <= restarted_at)
    assert slowest < 2.0, slowest
    assert any(path != "/v1/recommendations" for path, _ in outage)  # a propensity answer among them
    assert back and all(_uses_features(path, body) for path, body in back)
    assert recovered_in < 60
    # counted by the ingress: each answer without features, and its users as fallbacks
    after = _settled_metrics(world)
    unavailable = _metric(after, "shopsight_features_unavailable_total")
    assert unavailable - _metric(before, "shopsight_features_unavailable_total") == len(fallbacks)
    assert _metric(after, "shopsight_fallbacks_total") - _metric(before, "shopsight_fallbacks_total") >= len(
        fallbacks
    )
    assert _served_since(world) == loaded  # no replica restarted


def _ray_export_by_replica(name: str, **labels: str) -> dict[str, float]:
    """A metric as Ray's metrics agents export it, before /metrics sums it: per recording replica."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
                for sample in family.samples:
                    if sample.name == name and labels.items() <= sample.labels.items():
                        replica = sample.labels["replica"]
                        counts[replica] = counts.get(replica, 0.0) + sample.value
    return counts


def test_every_scrape_counts_every_ingress_replica(world):
    """Two replicas of the combined layout, each an ingress that answers its share of the requests:
    ``/metrics``, whichever replica the proxy sends a scrape to, reports the requests of both, summed from
    Ray's metrics export. (A registry per replica would report one replica's share, a different one from
    scrape to scrape.)"""
    from shopsight.serving.deploy import deploy

    settings = world["settings"]
    route = {"endpoint": "/v1/recommendations", "status": "200"}
    deploy(_serving(settings, replicas=2))
    try:
        _wait_for(lambda: len(_replica_pids(settings.serving.app_name, "api")) == 2, what="a second replica")
        before = _metric(_settled_metrics(world), "shopsight_requests_total", **route)
        by_replica_before = _ray_export_by_replica("ray_shopsight_requests_total", **route)
        users = _users(world, n=8)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda u: _post(world, "/v1/recommendations", {"user_id": u, "k": 5}),
                                    users * 8))  # fmt: skip
        assert [a.status_code for a in answers] == [200] * 64
        settled = _metric(_settled_metrics(world), "shopsight_requests_total", **route)
        # 8 scrapes: all on one replica of two has a chance of 1 in 128 under even routing
        scrapes = [
            _metric(requests.get(world["url"] + "/metrics", headers=AUTH, timeout=10).text,
                    "shopsight_requests_total", **route)
            for _ in range(8)
        ]  # fmt: skip
        by_replica = _ray_export_by_replica("ray_shopsight_requests_total", **route)
    finally:
        deploy(settings)
    assert settled - before == 64
    assert scrapes == [settled] * 8
    answered = {r: n - by_replica_before.get(r, 0.0) for r, n in by_replica.items()}
    assert sum(answered.values()) == 64 and sum(1 for n in answered.values() if n > 0) == 2, answered


def _replica_pids(app: str, deployment: str) -> list[int]:
    """The processes of a deployment's live replicas: Ray titles them ``ray::ServeReplica:APP:DEPLOYMENT``.
    Only this test process's own Ray (its descendants), never another session's on the same machine."""
    import psutil

    title = re.compile(rf"ray::ServeReplica:{re.escape(app)}:{re.escape(deployment)}(\.|\s|$)")
    pids = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() != psutil.STATUS_ZOMBIE and title.match(" ".join(process.cmdline())):
                pids.append(process.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def _not_logged(settings, request_ids: set, timeout_s: float) -> set:
    """The request ids not (yet) in the rolled prediction log, after waiting up to ``timeout_s`` for them."""
    deadline = time.time() + timeout_s
    while True:
        logged = read_predictions(settings.data_dir / "predictions").column("request_id").to_pylist()
        missing = request_ids - set(logged)
        if not missing or time.time() > deadline:
            return missing
        time.sleep(0.5)


def _serving(settings, **values):
    return settings.model_copy(update={"serving": settings.serving.model_copy(update=values)})


@pytest.mark.chaos
def test_a_model_replica_killed_under_load_loses_nothing_with_two_replicas(world, record):
    """One of the two replicas of the purchase model killed (SIGKILL) while 4 clients send propensity
    requests (20 users each: the model's share of a request's time is the largest): the ingress sends the
    requests the replica held once more, to the other one, so none fails (no non-2xx, no connection error),
    and Serve starts a replacement. The split layout, where model replicas are apart from the ingress: in
    the combined one the killed replica is the ingress too, and the requests it held are lost with it (the
    HTTP proxy does not resend)."""
    from ray import serve

    from shopsight.serving.deploy import deploy, status

    settings = world["settings"]
    app, deployment = settings.serving.app_name, "purchase"
    layout = "split" if deployment in status(settings)["deployments"] else "combined"
    users = _users(world, n=20)
    calls = [("/v1/purchase-propensity", {"user_ids": users[n:] + users[:n]}) for n in range(len(users))]
    deploy(_serving(settings, layout="split", replicas=2))  # from split: only the second replicas start
    try:
        replicas = _replica_pids(app, deployment)
        assert len(replicas) == 2, replicas
        victim = replicas[0]

        def replaced() -> bool:
            pids = _replica_pids(app, deployment)
            if len(pids) != 2 or victim in pids:
                return False
            states = serve.status().applications[app].deployments[deployment].replica_states
            return {str(getattr(k, "value", k)): n for k, n in states.items()} == {"RUNNING": 2}

        with _Load(world, calls) as load:
            _wait_for(lambda: len(load.seen) >= 20, timeout_s=30, what="answers before the fault")
            os.kill(victim, signal.SIGKILL)
            killed_at = time.time()
            _wait_for(replaced, timeout_s=90, what="Serve to replace the killed replica")
            recovered_at = time.time()
            _wait_for(lambda: len(load.sent_after(recovered_at)) >= 20, timeout_s=30,
                      what="answers after the replacement")  # fmt: skip
    finally:
        deploy(_serving(settings, layout=layout))  # one replica of each, in the layout it found
    seen = load.seen
    failed = load.failed()
    down = [s for s in seen if killed_at <= s[0] <= recovered_at]
    # the prediction log loses no answer: the killed replica's spool is rolled by the live ones (every 1 s)
    answered = {request_id for path, request_id in load.answered_ids}
    missing = _not_logged(settings, answered, timeout_s=30)
    record(
        in_flight=f"{len(seen)} requests at concurrency {CONCURRENCY}, {len(down)} while a replica was down; "
        f"{len(answered) - len(missing)} of {len(answered)} answers in the prediction log",
        lost=len(failed),
        recovered=len(down) - len(failed),
        seconds_to_recover=round(recovered_at - killed_at, 1),
    )
    assert not failed, failed[:5]
    assert len(down) >= 10
    assert all(body["model"]["version"] == world["purchase"] for *_, body in seen)
    assert not missing, f"{len(missing)} of {len(answered)} answers are not in the prediction log"
