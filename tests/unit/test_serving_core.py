"""The serving core without Ray: predictors (equal to the registered pyfuncs, fallback, canary, shadow,
hot swap), the alias watcher, and the HTTP app (auth, 4xx, metrics, schemathesis) in process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
import torch
from tests.conftest import purchase_frame

from shopsight.platform import ConfigError, ShopsightError, load_settings
from shopsight.platform.api_keys import authenticate, hash_key
from shopsight.serving.app import LocalBackend, build_app
from shopsight.serving.predictor import (
    LoadedModel,
    ModelWatcher,
    Popularity,
    ProbabilityPredictor,
    RecommendationPredictor,
    Routing,
    VersionRef,
    feature_frame,
)
from shopsight.serving.schemas import PropensityRequest, RecommendationRequest
from shopsight.training.binary.data import SnapshotFeatures
from shopsight.training.binary.pyfunc import SnapshotClassifier
from shopsight.training.binary.pyfunc import save_model_dir as save_purchase
from shopsight.training.models import build_model
from shopsight.training.next_item.pyfunc import NextItemRecommender
from shopsight.training.next_item.pyfunc import save_model_dir as save_next_item

NEXT, PURCHASE = "shopsight-next-item", "shopsight-purchase"
ITEMS = np.array([0, *range(1001, 1031)])  # model item k is shop item 1000 + k
KEY = "team-a-secret"
AS_OF = datetime(2017, 12, 3, 8, 0, tzinfo=UTC)

HISTORIES = {
    1: [1003, 1004, 1005, 1003],
    2: [1010, 5555, 1011],  # 5555: unknown to the model, skipped
    3: [5555, 7777],  # nothing the model knows: popularity fallback
    4: list(range(1001, 1021)),  # longer than max_len 8
}


class DictReader:
    """A feature reader over a dict (what the online store would return); counts its calls."""

    def __init__(self, rows: dict[int, dict], names: list[str]) -> None:
        self.rows, self.names, self.calls = rows, names, 0

    def read(self, user_ids):
        self.calls += 1
        out = {"user_id": list(user_ids)}
        for name in self.names:
            out[name] = [self.rows.get(u, {}).get(name) for u in user_ids]
        return out


def _recommender(folder, seed: int) -> NextItemRecommender:
    torch.manual_seed(seed)
    model = build_model("sasrec", n_items=30, max_len=8, d_model=16, n_heads=1, n_blocks=1, dropout=0.0)
    save_next_item(folder, "sasrec", model.eval(), ITEMS)
    rec = NextItemRecommender()
    rec.load(folder)
    return rec


@pytest.fixture(scope="module")
def recommenders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("next_item")
    return _recommender(folder / "a", 0), _recommender(folder / "b", 1)


POPULARITY = Popularity(item_ids=np.array([1020, 5555, 1001, 1002, 1003]), scores=np.array([9.0, 8, 7, 6, 5]))


def _loaded(model, version, alias="champion", popularity=POPULARITY, name=NEXT) -> LoadedModel:
    return LoadedModel(name=name, version=version, alias=alias, model=model, popularity=popularity)


def _next_item_predictor(recommenders, routing=None, challenger=True) -> RecommendationPredictor:
    reader = DictReader({u: {"seq_item_ids": h} for u, h in HISTORIES.items()}, ["seq_item_ids"])
    predictor = RecommendationPredictor(reader, NEXT, routing)
    a, b = recommenders
    predictor.swap(champion=_loaded(a, "1"), challenger=_loaded(b, "2", "challenger") if challenger else None)
    return predictor


def test_recommendations_equal_the_registered_pyfunc(recommenders):
    predictor = _next_item_predictor(recommenders)
    requests = [RecommendationRequest(user_id=u, k=k) for u, k in ((1, 5), (2, 3), (4, 10), (1, 1))]
    outcomes = predictor.answer(requests)  # one batch
    assert predictor.reader.calls == 1
    champion = recommenders[0]
    for request, outcome in zip(requests, outcomes, strict=True):
        history = HISTORIES[request.user_id]
        response = outcome.response
        assert response.model.version == "1" and response.model.alias == "champion"
        assert not response.fallback and response.source == "model"
        assert len(response.items) == request.k and not {i.item_id for i in response.items} & set(history)
        # user 4's history is longer than max_len: both leave out all 20 items, not only the last 8
        expected = champion.predict(None, pd.DataFrame({"item_ids": [history]}), {"k": request.k})
        assert [i.item_id for i in response.items] == expected["items"][0]
        assert np.allclose([i.score for i in response.items], expected["scores"][0], atol=1e-5)
    assert outcomes[0].batch_size == 4 and set(outcomes[0].timings) == {"features", "model"}


def test_exclude_seen_false_keeps_seen_items_in_the_raw_ranking(recommenders):
    predictor = _next_item_predictor(recommenders)
    (outcome,) = predictor.answer([RecommendationRequest(user_id=1, k=30, exclude_seen=False)])
    items = [i.item_id for i in outcome.response.items]
    assert len(items) == 30 and {1003, 1004, 1005} <= set(items)
    champion = recommenders[0]
    seq = torch.zeros((1, 8), dtype=torch.long)
    seq[0, 4:] = torch.tensor([3, 4, 5, 3])
    with torch.no_grad():
        raw = champion.model.predict(seq)[0]
    assert items == [int(ITEMS[i]) for i in torch.topk(raw, 30).indices]


def test_a_user_without_known_history_gets_popularity_flagged(recommenders):
    predictor = _next_item_predictor(recommenders)
    unknown, new = predictor.answer(
        [RecommendationRequest(user_id=3, k=3), RecommendationRequest(user_id=99, k=2, exclude_seen=False)]
    )
    assert unknown.response.fallback and unknown.response.source == "popularity"
    assert [i.item_id for i in unknown.response.items] == [1020, 1001, 1002]  # 5555 was seen: excluded
    assert [i.score for i in unknown.response.items] == [9.0, 7.0, 6.0]
    assert [i.item_id for i in new.response.items] == [1020, 5555]
    assert unknown.fallbacks == new.fallbacks == 1
    assert unknown.response.model.version == "1"
    # no popularity online: the network's answer to an empty history, flagged too
    predictor.swap(champion=_loaded(recommenders[0], "1", popularity=None))
    (prior,) = predictor.answer([RecommendationRequest(user_id=99, k=4)])
    assert (
        prior.response.fallback and prior.response.source == "model_prior" and len(prior.response.items) == 4
    )


def test_no_champion_is_a_503_with_a_message(recommenders):
    predictor = RecommendationPredictor(DictReader({}, ["seq_item_ids"]), NEXT)
    predictor.last_error = "shopsight-next-item has no version with alias champion"
    (outcome,) = predictor.answer([RecommendationRequest(user_id=1)])
    assert outcome.status == 503 and "no champion of shopsight-next-item" in outcome.error
    assert "no version with alias champion" in outcome.error


def test_canary_share_is_seeded_and_within_tolerance(recommenders):
    predictor = _next_item_predictor(recommenders, Routing(canary_share=0.25, seed=7))
    requests = [RecommendationRequest(user_id=1 + n % 4, k=2) for n in range(2000)]
    batches = [predictor.answer(requests[b : b + 50]) for b in range(0, 2000, 50)]
    versions = [o.response.model.version for batch in batches for o in batch]
    share = versions.count("2") / len(versions)
    assert abs(share - 0.25) < 0.03
    again = _next_item_predictor(recommenders, Routing(canary_share=0.25, seed=7))
    assert [o.response.model.version for o in again.answer(requests[:50])] == versions[:50]
    # the challenger's answers are its own, named as such
    outcome = next(
        o
        for o in predictor.answer(requests[:50])
        if o.response.model.version == "2" and o.response.user_id < 3
    )
    expected = recommenders[1].predict(
        None, pd.DataFrame({"item_ids": [HISTORIES[outcome.response.user_id]]}), {"k": 2}
    )
    assert [i.item_id for i in outcome.response.items] == expected["items"][0]
    assert outcome.response.model.alias == "challenger"
    # canary on, but no challenger loaded: everything goes to the champion
    alone = _next_item_predictor(recommenders, Routing(canary_share=0.5), challenger=False)
    assert {o.response.model.version for o in alone.answer(requests[:100])} == {"1"}


def test_shadow_never_changes_responses_and_is_logged(recommenders, caplog):
    requests = [RecommendationRequest(user_id=u, k=4) for u in (1, 2, 3, 4, 99)]
    plain = _next_item_predictor(recommenders).answer(requests)
    shadowed = _next_item_predictor(recommenders, Routing(shadow=True))
    with caplog.at_level(logging.INFO, logger="shopsight.serving.shadow"):
        outcomes = shadowed.answer(requests)
    assert [o.response for o in outcomes] == [o.response for o in plain]
    assert all(o.shadow is not None and o.shadow.challenger_version == "2" for o in outcomes)
    assert "shadow" in outcomes[0].timings
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "shopsight.serving.shadow"]
    assert [r["user_id"] for r in records] == [1, 2, 3, 4, 99]
    first = records[0]
    assert first["champion"] == "1" and first["challenger"] == "2"
    assert first["champion_items"] == [i.item_id for i in outcomes[0].response.items]
    assert 0.0 <= outcomes[0].shadow.difference <= 1.0


def test_a_batch_in_flight_finishes_on_the_model_it_started_with(recommenders):
    predictor = _next_item_predictor(recommenders, challenger=False)
    original_read = predictor.reader.read

    def read_then_promote(user_ids):
        predictor.swap(champion=_loaded(recommenders[1], "2"))  # a promotion lands mid-batch
        return original_read(user_ids)

    predictor.reader.read = read_then_promote
    (during,) = predictor.answer([RecommendationRequest(user_id=1, k=3)])
    predictor.reader.read = original_read
    (after,) = predictor.answer([RecommendationRequest(user_id=1, k=3)])
    assert during.response.model.version == "1" and after.response.model.version == "2"


# --------------------------------------------------------------------------------- purchase propensity


@pytest.fixture(scope="module")
def purchase(tmp_path_factory):
    frame = purchase_frame(users=40, days=2)
    features = SnapshotFeatures.fit(frame, max_len=8)
    torch.manual_seed(0)
    model = build_model(
        "sasrec", n_items=features.n_items, n_dense=features.n_dense, n_categories=features.n_categories,
        max_len=8, d_model=16, n_blocks=1, dropout=0.0,
    )  # fmt: skip
    folder = save_purchase(tmp_path_factory.mktemp("purchase"), "sasrec", model.eval(), features)
    loaded = SnapshotClassifier()
    loaded.load(folder)
    last = frame[frame.event_timestamp == frame.event_timestamp.max()]
    names = [c for c in frame.columns if c not in ("user_id", "event_timestamp", "buy_next_1d")]
    rows = {
        int(r["user_id"]): {n: (r[n].tolist() if isinstance(r[n], np.ndarray) else r[n]) for n in names}
        for _, r in last.iterrows()
    }
    for row in rows.values():  # the online store answers null, not NaN
        row.update({k: None for k, v in row.items() if isinstance(v, float) and np.isnan(v)})
    return loaded, DictReader(rows, names)


def test_propensity_equals_the_pyfunc_on_the_same_features(purchase):
    model, reader = purchase
    predictor = ProbabilityPredictor(reader, PURCHASE, clock=lambda: AS_OF)
    predictor.swap(champion=_loaded(model, "3", name=PURCHASE))
    requests = [PropensityRequest(user_ids=[1, 2, 3]), PropensityRequest(user_ids=[5, 10**9, 1])]
    outcomes = predictor.answer(requests)
    assert reader.calls == 1
    for request, outcome in zip(requests, outcomes, strict=True):
        frame = feature_frame(reader.read(request.user_ids), AS_OF)
        expected = model.predict(None, frame)["probability"].tolist()
        got = outcome.response.predictions
        assert [p.user_id for p in got] == request.user_ids
        assert np.allclose([p.probability for p in got], expected, atol=1e-6)
        assert outcome.response.model.version == "3" and outcome.response.as_of == AS_OF
    unknown = outcomes[1].response.predictions[1]
    assert not unknown.has_history and 0.0 < unknown.probability < 1.0 and outcomes[1].fallbacks == 1
    assert all(p.has_history for p in outcomes[0].response.predictions)


def test_propensity_shadow_leaves_answers_alone(purchase, tmp_path, caplog):
    model, reader = purchase
    predictor = ProbabilityPredictor(
        reader, PURCHASE, Routing(shadow=True), endpoint="/v1/purchase-propensity", clock=lambda: AS_OF
    )
    predictor.swap(
        champion=_loaded(model, "3", name=PURCHASE),
        challenger=_loaded(model, "4", "challenger", name=PURCHASE),
    )
    with caplog.at_level(logging.INFO, logger="shopsight.serving.shadow"):
        (outcome,) = predictor.answer([PropensityRequest(user_ids=[1, 2])])
    assert outcome.response.model.version == "3"
    assert outcome.shadow.agree and outcome.shadow.difference < 1e-9  # the same network: full agreement
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "shopsight.serving.shadow"]
    assert [r["endpoint"] for r in records] == ["/v1/purchase-propensity"]


# ----------------------------------------------------------------------------------------- the watcher


class FakeSource:
    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.loads: list[tuple[str, str]] = []
        self.fail: Exception | None = None

    def resolve(self, alias):
        if self.fail:
            raise self.fail
        version = self.aliases.get(alias)
        return VersionRef(version, run_id=f"run{version}") if version else None

    def load(self, ref, alias):
        self.loads.append((ref.version, alias))
        return LoadedModel(name=NEXT, version=ref.version, alias=alias, model=object(), run_id=ref.run_id)


def test_watcher_follows_the_aliases_and_reuses_a_loaded_challenger():
    predictor = RecommendationPredictor(DictReader({}, []), NEXT, Routing(canary_share=0.1))
    source = FakeSource()
    watcher = ModelWatcher(predictor, source, interval_s=0.05)
    assert not watcher.poll_once()
    assert predictor.served.champion is None and "no version with alias champion" in predictor.last_error
    source.aliases = {"champion": "1", "challenger": "2"}
    assert watcher.poll_once()
    assert (predictor.served.champion.version, predictor.served.challenger.version) == ("1", "2")
    assert not watcher.poll_once() and predictor.last_error is None
    source.aliases = {"champion": "2", "challenger": "2"}  # the challenger is promoted
    assert watcher.poll_once()
    assert predictor.served.champion.version == "2" and predictor.served.champion.alias == "champion"
    assert source.loads == [("1", "champion"), ("2", "challenger")]  # no second load of version 2
    source.fail = ConnectionError("registry away")
    assert not watcher.poll_once()
    assert predictor.served.champion.version == "2" and "registry did not answer" in predictor.last_error
    assert "registry away" not in predictor.last_error  # the exception's text is logged, not shown
    source.fail = None
    predictor.set_routing(Routing())  # canary off: the challenger is dropped
    assert watcher.poll_once() and predictor.served.challenger is None


def test_watcher_thread_swaps_in_the_background():
    predictor = RecommendationPredictor(DictReader({}, []), NEXT)
    source = FakeSource()
    source.aliases = {"champion": "5"}
    watcher = ModelWatcher(predictor, source, interval_s=0.02)
    watcher.start()
    try:
        for _ in range(200):
            if predictor.served.champion is not None:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert predictor.served.champion.version == "5"
    finally:
        watcher.stop()


# ------------------------------------------------------------------------------------------- HTTP app


def call(app, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """One request through the ASGI app; returns (status, headers, parsed JSON or text)."""
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"),
                    *[(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]],
        "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
    }  # fmt: skip
    messages: list[dict] = []

    async def run():
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message):
            messages.append(message)

        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    hdrs = {k.decode(): v.decode() for k, v in start["headers"]}
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = body.decode()
    return start["status"], hdrs, parsed


@pytest.fixture
def app(recommenders, purchase):
    next_item = _next_item_predictor(recommenders, challenger=False)
    model, reader = purchase
    propensity = ProbabilityPredictor(reader, PURCHASE, clock=lambda: AS_OF)
    propensity.swap(champion=_loaded(model, "3", name=PURCHASE))
    return build_app(
        LocalBackend({"next_item": next_item, "purchase": propensity}),
        {"team_a": hash_key(KEY)},
        max_user_ids=5,
    )


AUTH = {"X-API-Key": KEY}


class StoreDown:
    """A feature reader whose online store can be down: ``read`` then raises, as Redis's client does."""

    def __init__(self, reader: DictReader) -> None:
        self.reader, self.feature_names, self.down = reader, reader.names, False

    def read(self, user_ids):
        if self.down:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return self.reader.read(user_ids)


def test_an_online_store_that_cannot_be_read_gives_named_fallbacks_never_a_5xx(
    recommenders, purchase, caplog
):
    histories = StoreDown(
        DictReader({u: {"seq_item_ids": h} for u, h in HISTORIES.items()}, ["seq_item_ids"])
    )
    next_item = RecommendationPredictor(histories, NEXT)
    next_item.swap(champion=_loaded(recommenders[0], "1"))
    model, reader = purchase
    snapshots = StoreDown(reader)
    propensity = ProbabilityPredictor(snapshots, PURCHASE, clock=lambda: AS_OF)
    propensity.swap(champion=_loaded(model, "3", name=PURCHASE))
    app = build_app(LocalBackend({"next_item": next_item, "purchase": propensity}), {"t": hash_key(KEY)})
    unknown = call(app, "POST", "/v1/purchase-propensity", {"user_ids": [10**9]}, AUTH)[2]["predictions"][0]
    histories.down = snapshots.down = True
    with caplog.at_level(logging.WARNING, logger="shopsight.serving"):
        for _ in range(2):
            status, _, body = call(app, "POST", "/v1/recommendations", {"user_id": 1, "k": 3}, AUTH)
            assert status == 200 and body["features_unavailable"]
            assert body["fallback"] and body["source"] == "popularity"
            assert [i["item_id"] for i in body["items"]] == [1020, 5555, 1001]  # nothing seen to exclude
        status, _, body = call(app, "POST", "/v1/purchase-propensity", {"user_ids": [1, 2]}, AUTH)
        assert status == 200 and body["features_unavailable"]
        assert [(p["has_history"], p["probability"]) for p in body["predictions"]] == [
            (False, unknown["probability"])
        ] * 2  # scored as users the store does not know
        histories.down = snapshots.down = False  # back: the next request reads it again
        status, _, body = call(app, "POST", "/v1/recommendations", {"user_id": 1, "k": 3}, AUTH)
        assert status == 200 and body["source"] == "model" and not body["features_unavailable"]
    warnings = [r.getMessage() for r in caplog.records]
    assert (
        sum("cannot be read" in w for w in warnings) == 2 and sum("answers again" in w for w in warnings) == 1
    )
    text = call(app, "GET", "/metrics", headers=AUTH)[2]
    unavailable = [
        line for line in text.splitlines() if line.startswith("shopsight_features_unavailable_total")
    ]
    assert unavailable == [
        'shopsight_features_unavailable_total{endpoint="/v1/recommendations"} 2.0',
        'shopsight_features_unavailable_total{endpoint="/v1/purchase-propensity"} 1.0',
    ]


def test_keys_are_checked_by_digest_in_either_header():
    keys = {"a": hash_key("k1"), "b": hash_key("k2")}
    assert authenticate({"x-api-key": "k2"}, keys) == "b"
    assert authenticate({"authorization": "Bearer k1"}, keys) == "a"
    assert authenticate({"authorization": "Basic k1"}, keys) is None
    assert authenticate({"x-api-key": "k3"}, keys) is None and authenticate({}, keys) is None
    assert authenticate({"x-api-key": "k1"}, {}) is None


def test_api_answers_with_the_version_and_timings(app):
    status, headers, body = call(app, "POST", "/v1/recommendations", {"user_id": 1, "k": 3}, AUTH)
    assert status == 200 and len(body["items"]) == 3
    assert body["model"] == {"name": NEXT, "version": "1", "alias": "champion"} and body["source"] == "model"
    assert "features;dur=" in headers["server-timing"] and "model;dur=" in headers["server-timing"]
    status, _, body = call(
        app, "POST", "/v1/purchase-propensity", {"user_ids": [1, 2]}, {"Authorization": f"Bearer {KEY}"}
    )
    assert status == 200 and [p["user_id"] for p in body["predictions"]] == [1, 2]
    assert body["model"]["version"] == "3"
    status, _, body = call(app, "GET", "/v1/models", headers=AUTH)
    assert status == 200 and body["next_item"]["champion"]["version"] == "1"
    assert body["purchase"]["champion"]["version"] == "3" and body["next_item"]["challenger"] is None


def test_missing_or_wrong_key_is_401_before_the_body_is_read(app):
    for headers in ({}, {"X-API-Key": "nope"}, {"Authorization": "Bearer nope"}):
        status, hdrs, body = call(app, "POST", "/v1/recommendations", raw=b"{not json", headers=headers)
        assert status == 401 and "API key" in body["error"] and hdrs["www-authenticate"] == "Bearer"
    assert call(app, "GET", "/v1/models")[0] == 401
    status, _, body = call(app, "GET", "/healthz")
    assert status == 200 and body == {"status": "ok", "models": {NEXT: "1", PURCHASE: "3"}, "problems": {}}
    assert call(app, "GET", "/openapi.json")[0] == 200 and call(app, "GET", "/docs")[0] == 200


@pytest.mark.parametrize(
    ("path", "raw", "fragment"),
    [
        ("/v1/recommendations", b'{"user_id": 1,', "JSON"),
        ("/v1/recommendations", b'{"user_id": "1"}', "user_id"),
        ("/v1/recommendations", b'{"user_id": 1, "k": 0}', "k"),
        ("/v1/recommendations", b'{"user_id": 1, "k": 101}', "k"),
        ("/v1/recommendations", b'{"user_id": 1, "k": 2.5}', "k"),
        ("/v1/recommendations", b'{"user_id": -1}', "user_id"),
        ("/v1/recommendations", b'{"user_id": 99999999999999999999}', "user_id"),
        ("/v1/recommendations", b'{"user_id": 1, "exclude_seen": "yes"}', "exclude_seen"),
        ("/v1/recommendations", b'{"user_id": 1, "extra": 1}', "extra"),
        ("/v1/recommendations", b"[1, 2]", "body"),
        ("/v1/recommendations", b"", "body"),
        ("/v1/purchase-propensity", b'{"user_ids": []}', "user_ids"),
        ("/v1/purchase-propensity", b'{"user_ids": [1, 2, 3, 4, 5, 6]}', "user_ids"),
        ("/v1/purchase-propensity", b'{"user_ids": [1, "x"]}', "user_ids"),
    ],
)
def test_bad_input_is_422_naming_the_problem(app, path, raw, fragment):
    status, _, body = call(app, "POST", path, raw=raw, headers=AUTH)
    assert status == 422, body
    assert body["error"].startswith("invalid request") and fragment.lower() in json.dumps(body).lower()


def test_unknown_routes_and_methods_are_4xx_json(app):
    status, _, body = call(app, "GET", "/nope", headers=AUTH)
    assert status == 404 and body == {"detail": "Not Found"}
    assert call(app, "GET", "/v1/nope", headers=AUTH)[0] == 404
    assert call(app, "GET", "/v1/recommendations", headers=AUTH)[0] == 405


def test_no_champion_is_503_and_health_says_degraded(recommenders, purchase):
    empty = RecommendationPredictor(DictReader({}, ["seq_item_ids"]), NEXT)
    propensity = ProbabilityPredictor(purchase[1], PURCHASE)
    app = build_app(LocalBackend({"next_item": empty, "purchase": propensity}), {"t": hash_key(KEY)})
    status, _, body = call(app, "POST", "/v1/recommendations", {"user_id": 1}, AUTH)
    assert status == 503 and "no champion of shopsight-next-item" in body["error"]
    status, _, body = call(app, "GET", "/healthz")
    assert status == 503 and body["status"] == "degraded" and set(body["problems"]) == {NEXT, PURCHASE}


def test_metrics_count_requests_fallbacks_and_served_versions(app):
    call(app, "POST", "/v1/recommendations", {"user_id": 1}, AUTH)
    call(app, "POST", "/v1/recommendations", {"user_id": 3}, AUTH)  # popularity fallback
    call(app, "POST", "/v1/recommendations", {"user_id": 1})  # 401
    status, _, text = call(app, "GET", "/metrics", headers=AUTH)
    assert status == 200
    lines = text.splitlines()

    def value(prefix):
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    assert value('shopsight_requests_total{endpoint="/v1/recommendations",status="200",team="team_a"}') == 2
    assert value('shopsight_requests_total{endpoint="/v1/recommendations",status="401",team="-"}') == 1
    assert value('shopsight_fallbacks_total{endpoint="/v1/recommendations"}') == 1
    assert value(f'shopsight_served_version{{alias="champion",model="{NEXT}",version="1"}}') == 1
    assert value('shopsight_request_latency_seconds_count{endpoint="/v1/recommendations",team="team_a"}') == 2
    assert value('shopsight_request_latency_seconds_count{endpoint="/v1/recommendations",') == 3
    assert value('shopsight_stage_seconds_count{endpoint="/v1/recommendations",stage="features"}') == 2


def test_metrics_name_teams_so_they_need_a_key_unless_opened(recommenders, purchase):
    def app(**options):
        predictors = {
            "next_item": _next_item_predictor(recommenders),
            "purchase": ProbabilityPredictor(purchase[1], PURCHASE),
        }
        return build_app(LocalBackend(predictors), {"t": hash_key(KEY)}, **options)

    closed = app()
    assert (
        call(closed, "GET", "/metrics")[0] == 401 and call(closed, "GET", "/metrics", headers=AUTH)[0] == 200
    )
    bearer = {"Authorization": f"Bearer {KEY}"}  # what Prometheus's `authorization` block sends
    assert call(closed, "GET", "/metrics", headers=bearer)[0] == 200
    assert call(app(metrics_open=True), "GET", "/metrics")[0] == 200


def test_schemathesis_finds_no_server_error(app):
    """Generated valid and invalid requests against the app's own OpenAPI spec: never a 5xx."""
    seen = fuzz(lambda case: case.call(headers=AUTH), schema_app=app, examples=25)
    assert {200, 422} <= seen and not any(s >= 500 for s in seen)


def fuzz(call, *, schema_app=None, schema_url: str | None = None, examples: int = 25) -> set[int]:
    """Schemathesis cases (valid and invalid) of every operation of the app's OpenAPI spec, sent with
    ``call(case)``; asserts that none gets a 5xx and returns the statuses seen."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase

    if schema_app is not None:
        schema = schemathesis.openapi.from_asgi("/openapi.json", schema_app)
    else:
        schema = schemathesis.openapi.from_url(schema_url)
    statuses: set[int] = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=examples, deadline=None, database=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
            )  # fmt: skip
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                response = call(case)
                statuses.add(response.status_code)
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} {case.body!r} -> {response.status_code}: "
                    f"{response.text[:300]}"
                )

            # no invalid request exists for an operation without inputs
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                run()
    return statuses


def test_api_keys_setting_takes_digests_only():
    digest = hash_key("k")
    settings = load_settings(overrides={"serving.api_keys.team_a": digest}, environ={}).settings
    assert settings.serving.api_keys == {"team_a": digest}
    with pytest.raises(ConfigError, match="sha256 hex digest"):
        load_settings(overrides={"serving.api_keys.team_a": "plain-key"}, environ={})
    with pytest.raises(ConfigError, match="canary_share"):
        load_settings(overrides={"serving.canary_share": "1.5"}, environ={})


def test_serve_key_prints_a_key_and_its_digest():
    from typer.testing import CliRunner

    from shopsight.cli import app as cli

    result = CliRunner().invoke(cli, ["serve", "key", "team_a"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = dict(line.split(": ", 1) for line in result.output.splitlines() if ": " in line)
    key, setting = rows["key (shown once)"], rows["setting"]
    assert setting == f"serving.api_keys.team_a={hash_key(key)}"
    assert CliRunner().invoke(cli, ["serve", "key", "Team A"]).exit_code != 0


def test_model_dir_is_read_from_the_mlmodel_file(tmp_path):
    from shopsight.serving.models import _artifact_dir

    artifacts = {"model_dir": {"path": "artifacts/next_item_0"}}
    mlmodel = {"flavors": {"python_function": {"artifacts": artifacts}}}
    (tmp_path / "MLmodel").write_text(json.dumps(mlmodel))  # JSON is YAML
    assert _artifact_dir(tmp_path) == tmp_path / "artifacts" / "next_item_0"


def test_routing_and_batching_are_user_config_and_the_code_version_ignores_them():
    from shopsight.serving.deploy import _code_version, user_config

    settings = load_settings(environ={}).settings
    config = user_config(settings.serving, canary_share=0.2, shadow=None)
    assert config["canary_share"] == 0.2 and config["shadow"] is False and config["max_batch_size"] == 16
    with pytest.raises(ShopsightError, match="canary_share"):
        user_config(settings.serving, canary_share=2.0)
    with pytest.raises(ShopsightError, match="not a reconfigurable"):
        user_config(settings.serving, replicas=3)
    routed = load_settings(overrides={"serving.canary_share": "0.5"}, environ={}).settings
    moved = load_settings(overrides={"serving.num_cpus": "2"}, environ={}).settings
    assert _code_version(routed) == _code_version(settings) != _code_version(moved)
    # scaling is no new version either: Serve adds or stops replicas and leaves the others serving
    scaled = load_settings(overrides={"serving.replicas": "3", "serving.ingress_replicas": "2"}, environ={})
    assert _code_version(scaled.settings) == _code_version(settings)


def test_shadow_comparisons_are_counted_by_the_ingress(recommenders, purchase):
    shadowed = _next_item_predictor(recommenders, Routing(shadow=True))
    app = build_app(
        LocalBackend({"next_item": shadowed, "purchase": ProbabilityPredictor(purchase[1], PURCHASE)}),
        {"t": hash_key(KEY)},
    )
    for user in (1, 2, 3):
        assert call(app, "POST", "/v1/recommendations", {"user_id": user}, AUTH)[0] == 200
    text = call(app, "GET", "/metrics", headers=AUTH)[2]
    counted = [line for line in text.splitlines() if line.startswith("shopsight_shadow_comparisons_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counted) == 3
    assert any('stage="shadow"' in line for line in text.splitlines())


def test_routes_come_from_the_task_table(recommenders, purchase):
    """A task added to the table is served with no change to the serving core: churn's route, its
    registered model and its place in /v1/models come from its table entry."""
    from shopsight.training.tasks import get_task

    model, reader = purchase
    churn = get_task("churn")
    predictors = {}
    for name in ("purchase", "churn"):
        task = get_task(name)
        predictor = ProbabilityPredictor(reader, task.registered_model, endpoint=task.route.path)
        predictor.swap(champion=_loaded(model, "7", name=task.registered_model))
        predictors[name] = predictor
    app = build_app(
        LocalBackend({"next_item": _next_item_predictor(recommenders), **predictors}), {"t": hash_key(KEY)}
    )
    status, _, body = call(app, "POST", churn.route.path, {"user_ids": [2, 1]}, AUTH)
    assert status == 200 and [p["user_id"] for p in body["predictions"]] == [2, 1]
    assert body["model"] == {"name": "shopsight-churn", "version": "7", "alias": "champion"}
    assert all(0.0 <= p["probability"] <= 1.0 for p in body["predictions"])
    status, _, body = call(app, "POST", churn.route.path, {"user_ids": [1], "k": 3}, AUTH)
    assert status == 422 and "k" in body["error"]  # the same strict 4xx contract as every route
    assert call(app, "POST", churn.route.path, {"user_ids": [1]})[0] == 401
    status, _, models = call(app, "GET", "/v1/models", headers=AUTH)
    assert status == 200 and set(models) == {"next_item", "purchase", "churn"}
    assert models["churn"]["champion"]["version"] == "7"
    _, _, spec = call(app, "GET", "/openapi.json")
    assert {"/v1/recommendations", "/v1/purchase-propensity", "/v1/churn-risk"} <= set(spec["paths"])


def test_every_answer_is_logged_with_its_request_id_team_and_features(recommenders, purchase, tmp_path):
    """Each user answered is a record: the request id the client got back (or sent), the team of its key,
    the model version and alias, the features used and the answer; a shadow challenger's answers are
    records of their own under the same request id."""
    from shopsight.serving.prediction_log import PredictionLog, read_predictions

    answers_log = PredictionLog(tmp_path / "spool", tmp_path / "predictions", roll_interval_s=0)
    shadowed = _next_item_predictor(recommenders, Routing(shadow=True))
    model, reader = purchase
    propensity = ProbabilityPredictor(reader, PURCHASE, clock=lambda: AS_OF)
    propensity.swap(champion=_loaded(model, "3", name=PURCHASE))
    app = build_app(
        LocalBackend({"next_item": shadowed, "purchase": propensity}, answers_log),
        {"team_a": hash_key(KEY), "team_b": hash_key("team-b-secret")},
    )
    _, headers, recommended = call(app, "POST", "/v1/recommendations", {"user_id": 1, "k": 3}, AUTH)
    first_id = headers["x-request-id"]
    _, headers, propensities = call(
        app, "POST", "/v1/purchase-propensity", {"user_ids": [1, 2]},
        {"X-API-Key": "team-b-secret", "X-Request-Id": "retry-42"},
    )  # fmt: skip
    assert "x-request-id" not in headers  # the client's own, kept (Ray Serve's proxy echoes it)
    assert call(app, "POST", "/v1/recommendations", {"user_id": 1}, {"X-API-Key": "wrong"})[0] == 401
    assert answers_log.roll() == 2 + 2  # champion and shadow for the recommendation, two users
    rows = read_predictions(tmp_path / "predictions").to_pylist()
    by_alias = {(r["task"], r["alias"], r["user_id"]): r for r in rows}
    champion = by_alias[("next_item", "champion", 1)]
    assert champion["request_id"] == first_id and champion["team"] == "team_a"
    assert (champion["model"], champion["version"]) == (NEXT, "1")
    assert champion["items"] == [i["item_id"] for i in recommended["items"]]
    assert json.loads(champion["features"]) == {"seq_item_ids": HISTORIES[1]}
    shadow = by_alias[("next_item", "shadow", 1)]
    assert shadow["request_id"] == first_id and shadow["version"] == "2" and len(shadow["items"]) == 3
    for p in propensities["predictions"]:
        row = by_alias[("purchase", "champion", p["user_id"])]
        assert row["request_id"] == "retry-42" and row["team"] == "team_b"
        assert row["probability"] == pytest.approx(p["probability"])
        assert row["as_of"] == AS_OF
        logged = json.loads(row["features"])
        seen = reader.read([p["user_id"]])  # the values the model saw
        assert logged == {name: values[0] for name, values in seen.items() if name != "user_id"}
    # turned off (serving.prediction_log: false), nothing more is written
    for predictor in (shadowed, propensity):
        predictor.log_answers = False
    call(app, "POST", "/v1/recommendations", {"user_id": 2}, AUTH)
    assert answers_log.roll() == 0
    answers_log.close()
