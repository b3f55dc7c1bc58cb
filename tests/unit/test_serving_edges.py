"""The HTTP API at its edges, in process and without models: bodies JSON forbids, bodies and headers over
the limits, error bodies that stay small and JSON, any Content-Type, no internals in answers, health."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

import pytest

from shopsight.platform.api_keys import hash_key
from shopsight.serving.app import LocalBackend, build_app
from shopsight.serving.predictor import (
    LoadedModel,
    ModelWatcher,
    Outcome,
    ProbabilityPredictor,
    RecommendationPredictor,
    VersionRef,
)
from shopsight.serving.schemas import ModelRef, PropensityResponse, RecommendationResponse, UserProbability

NEXT, PURCHASE = "shopsight-next-item", "shopsight-purchase"
KEY = "team-a-secret"
AUTH = {"x-api-key": KEY}
RECS, PROPENSITY = "/v1/recommendations", "/v1/purchase-propensity"
TMP_ERROR = "[Errno 2] No such file or directory: '/tmp/shopsight-serve-x1y2/artifacts/model_dir/model.pt'"


class NoReader:
    def read(self, user_ids):
        return {"user_id": list(user_ids)}


class StubPredictors(LocalBackend):
    """Real predictors (for /v1/models and /healthz) that answer every request at once, without models:
    what the HTTP layer does is under test here, not the scoring."""

    def __init__(self, champions: bool = True) -> None:
        predictors = {
            "next_item": RecommendationPredictor(NoReader(), NEXT),
            "purchase": ProbabilityPredictor(NoReader(), PURCHASE),
        }
        if champions:
            for predictor in predictors.values():
                predictor.swap(champion=_loaded(predictor.registered_name, "1"))
        super().__init__(predictors)

    async def answer(self, task: str, request, context=None) -> Outcome:
        predictor = self.predictors[task]
        if predictor.served.champion is None:
            return Outcome.unavailable(predictor._no_champion(), 1)
        ref = ModelRef(
            name=predictor.registered_name, version=predictor.served.champion.version, alias="champion"
        )
        if task == "next_item":
            return Outcome(
                response=RecommendationResponse(
                    user_id=request.user_id, items=[], model=ref, fallback=False, source="model"
                )
            )
        predictions = [
            UserProbability(user_id=u, probability=0.5, has_history=True) for u in request.user_ids
        ]
        return Outcome(
            response=PropensityResponse(predictions=predictions, model=ref, as_of=datetime.now(UTC))
        )


def _loaded(name: str, version: str, alias: str = "champion") -> LoadedModel:
    return LoadedModel(name=name, version=version, alias=alias, model=object())


def _app(backend=None, **options):
    return build_app(backend or StubPredictors(), {"team_a": hash_key(KEY)}, max_user_ids=5, **options)


def send(app, method: str, path: str, chunks=(), headers=None, content_type: str | None = "application/json"):
    """One request through the ASGI app, its body in ``chunks`` (no Content-Length unless in ``headers``,
    as a chunked upload); returns (status, headers, raw body, chunks the app read)."""
    if isinstance(chunks, bytes):
        chunks = (chunks,)
    pairs = [(b"content-type", content_type.encode())] if content_type is not None else []
    pairs += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": pairs, "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
    }  # fmt: skip
    pending = list(chunks) or [b""]
    read, messages = [0], []

    async def receive():
        if pending:
            read[0] += 1
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}
        await asyncio.sleep(3600)  # a client that waits for the answer

    async def reply(message):
        messages.append(message)

    asyncio.run(app(scope, receive, reply))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, read[0]


def strict_json(raw: bytes):
    """Parse as RFC 8259 JSON: UTF-8, no NaN or Infinity, no lone surrogates."""

    def refuse(name):
        raise ValueError(f"{name} in an answer")

    value = json.loads(raw.decode("utf-8"), parse_constant=refuse)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return value


def documented(app, path: str, status: int) -> dict:
    spec = strict_json(send(app, "GET", "/openapi.json")[2])
    method = "post" if path != "/v1/models" else "get"
    return spec["paths"][path][method]["responses"].get(str(status))


def error_body(raw: bytes) -> dict:
    body = strict_json(raw)
    assert isinstance(body["error"], str) and set(body) <= {"error", "detail"}, body
    return body


# ------------------------------------------------------------------------ 1. bodies JSON does not allow


@pytest.mark.parametrize(
    ("path", "raw", "where", "problem"),
    [
        (RECS, b'{"user_id": NaN}', "user_id", "NaN"),
        (RECS, b'{"user_id": 1, "k": -Infinity}', "k", "-Infinity"),
        (PROPENSITY, b'{"user_ids": [1, Infinity]}', "user_ids.1", "Infinity"),
        (RECS, b'{"user_id": "\\ud800"}', "user_id", "surrogate"),
        (RECS, b'{"\\ud800": 1}', "\\ud800", "surrogate"),
        (PROPENSITY, b'{"user_ids": [1], "x": {"y": ["\\udfff"]}}', "x.y.0", "surrogate"),
    ],
)
def test_values_json_forbids_are_a_422_naming_the_field(path, raw, where, problem):
    app = _app()
    status, headers, body, _ = send(app, "POST", path, raw, AUTH)
    assert status == 422, body
    assert headers["content-type"] == "application/json"
    error = error_body(body)
    assert error["error"].startswith(f"invalid request: {where}: ") and problem in error["error"], error
    assert documented(app, path, 422)["content"]["application/json"]["schema"]["$ref"].endswith(
        "ErrorResponse"
    )


def test_a_valid_surrogate_pair_is_accepted():
    # 😀 as JSON escapes: a pair of surrogates is valid JSON; only a lone one is not
    status, _, body, _ = send(_app(), "POST", RECS, b'{"user_id": 1, "\\ud83d\\ude00": 1}', AUTH)
    assert status == 422 and "\U0001f600" in error_body(body)["error"]  # an unknown field, named


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"user_id": "\xff\xfe"}', "UTF-8"),
        (b"[" * 60_000, "nested"),  # within the body limit (100,000 is a 413)
        (b'{"user_id": ' + b"7" * 5000 + b"}", "digits"),
        (b'{"user_id": 1e999}', "user_id"),  # valid JSON, beyond a float: the schema's 422
        (b'{"user_id": 1,', "JSON"),
    ],
)
def test_bodies_that_do_not_parse_are_a_documented_422(raw, fragment):
    app = _app()
    status, _, body, _ = send(app, "POST", RECS, raw, AUTH)
    assert status == 422, body
    error = error_body(body)
    assert error["error"].startswith("invalid request") and fragment in error["error"], error
    assert len(body) < 2000
    assert documented(app, RECS, 422) is not None


# --------------------------------------------------------------------------------------- 2. size limits


def test_a_declared_body_over_the_limit_is_413_before_it_is_read():
    app = _app(max_body_bytes=1000)
    status, _, body, read = send(app, "POST", RECS, b"x" * 2000, {**AUTH, "content-length": "2000"})
    assert status == 413 and read == 0
    assert "1000 bytes" in error_body(body)["error"]
    for path in (RECS, PROPENSITY):
        assert documented(app, path, 413)["content"]["application/json"]["schema"]["$ref"].endswith(
            "ErrorResponse"
        )


def test_a_streamed_body_over_the_limit_is_413_and_not_read_to_the_end():
    app = _app(max_body_bytes=1000)
    chunks = [b'{"user_ids": [' + b"1," * 200] + [b"1," * 200] * 50  # chunked: no Content-Length
    status, _, body, read = send(app, "POST", PROPENSITY, chunks, AUTH)
    assert status == 413 and read < len(chunks)
    assert "1000 bytes" in error_body(body)["error"]
    # at the limit it is read and parsed
    assert send(app, "POST", PROPENSITY, [b'{"user_ids": ', b"[1, 2]}"], AUTH)[0] == 200


def test_headers_over_the_limit_are_431():
    app = _app(max_header_bytes=2048)
    status, _, body, read = send(app, "POST", RECS, b'{"user_id": 1}', {**AUTH, "x-junk": "j" * 4000})
    assert status == 431 and read == 0 and "2048 bytes" in error_body(body)["error"]
    assert send(app, "GET", "/healthz", headers={"cookie": "c" * 4000})[0] == 431
    assert documented(app, RECS, 431) is not None
    assert send(app, "POST", RECS, b'{"user_id": 1}', {**AUTH, "x-fine": "j" * 1000})[0] == 200


def test_errors_echo_only_a_short_preview_of_the_input():
    app = _app()
    huge = b'{"user_id": 1, "note": "' + b"a" * 50_000 + b'"}'
    status, _, body, _ = send(app, "POST", RECS, huge, AUTH)
    assert status == 422 and len(body) < 1000 and "note" in error_body(body)["error"]
    ids = b'{"user_ids": [' + b",".join(b"%d" % i for i in range(5000)) + b"]}"
    status, _, body, _ = send(app, "POST", PROPENSITY, ids, AUTH)
    error = error_body(body)
    assert status == 422 and len(body) < 1000 and "at most 5 items" in error["error"], error
    long_key = b'{"' + b"k" * 5000 + b'": 1}'
    status, _, body, _ = send(app, "POST", RECS, long_key, AUTH)
    assert status == 422 and len(body) < 1000


def test_the_user_ids_limit_is_in_the_spec():
    spec = strict_json(send(_app(), "GET", "/openapi.json")[2])
    schema = spec["components"]["schemas"]["PropensityRequest"]["properties"]["user_ids"]
    assert schema["maxItems"] == 5 and "at most 5" in schema["description"]


def test_the_default_body_limit_keeps_a_worst_case_body_quick():
    """Parsing and validating a body holds the GIL, off the event loop or not: the cap is what bounds the
    stall of the other requests (5.2M user ids used to take 5.8 s)."""
    app = build_app(StubPredictors(), {"team_a": hash_key(KEY)})  # serving.max_user_ids: 100
    limit = app.state.max_body_bytes
    assert limit <= 128 * 1024
    worst = b'{"user_ids": [' + b"1," * ((limit - 20) // 2) + b"1]}"  # the most values a body can hold
    assert len(worst) <= limit
    started = time.perf_counter()
    status, _, body, _ = send(app, "POST", PROPENSITY, worst, AUTH)
    assert status == 422 and "at most 100 items" in error_body(body)["error"]
    assert time.perf_counter() - started < 0.25
    # max_user_ids of the largest int64 ids still fit
    big = build_app(StubPredictors(), {"team_a": hash_key(KEY)}, max_user_ids=10_000)
    ids = b'{"user_ids": [' + b", ".join([b"9223372036854775807"] * 10_000) + b"]}"
    assert send(big, "POST", PROPENSITY, ids, AUTH)[0] == 200


# -------------------------------------------------------------------------------- 3. any Content-Type


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", None, "application/json"]
)
def test_a_json_body_is_json_whatever_the_content_type(content_type):
    """`curl -d '{...}'` sends application/x-www-form-urlencoded."""
    app = _app()
    status, _, body, _ = send(app, "POST", RECS, b'{"user_id": 7, "k": 3}', AUTH, content_type=content_type)
    assert status == 200, body
    assert json.loads(body)["user_id"] == 7
    status, _, body, _ = send(app, "POST", PROPENSITY, b'{"user_ids": [1]}', AUTH, content_type=content_type)
    assert status == 200, body
    status, _, body, _ = send(app, "POST", RECS, b"user_id=7", AUTH, content_type=content_type)
    assert status == 422 and "JSON" in error_body(body)["error"]


# ------------------------------------------------------------------- 4. no internals; honest health


class BrokenSource:
    """The registry: the champion alias points at ``version``; versions in ``broken`` cannot load."""

    def __init__(self, version: str, broken=()) -> None:
        self.version, self.broken = version, set(broken)

    def resolve(self, alias):
        return VersionRef(self.version) if alias == "champion" else None

    def load(self, ref, alias):
        if ref.version in self.broken:
            raise FileNotFoundError(TMP_ERROR)
        return _loaded(NEXT, ref.version, alias)


def test_a_champion_that_cannot_load_shows_no_path_and_health_is_503(caplog):
    backend = StubPredictors(champions=False)
    predictor = backend.predictors["next_item"]
    backend.predictors["purchase"].swap(champion=_loaded(PURCHASE, "3"))
    watcher = ModelWatcher(predictor, BrokenSource("7", broken={"7"}))
    with caplog.at_level("WARNING", logger="shopsight.serving"):
        watcher.poll_once()
    assert TMP_ERROR in caplog.text  # the whole error is in the server's log
    app = _app(backend)
    status, _, body, _ = send(app, "GET", "/v1/models", headers=AUTH)
    models = strict_json(body)
    assert status == 200 and "/tmp" not in body.decode()
    assert "version 7" in models["next_item"]["error"] and "server log" in models["next_item"]["error"]
    assert models["next_item"]["champion_error"] and models["purchase"]["champion_error"] is None
    status, _, body, _ = send(app, "POST", RECS, b'{"user_id": 1}', AUTH)
    assert status == 503 and "/tmp" not in body.decode() and "version 7" in body.decode()
    status, _, body, _ = send(app, "GET", "/healthz")
    health = strict_json(body)
    assert status == 503 and health["status"] == "degraded" and "/tmp" not in body.decode()
    assert health["models"] == {NEXT: None, PURCHASE: "3"}
    assert set(health["problems"]) == {NEXT} and "version 7" in health["problems"][NEXT]
    assert documented(app, "/v1/models", 200) is not None
    spec = strict_json(send(app, "GET", "/openapi.json")[2])
    assert "503" in spec["paths"]["/healthz"]["get"]["responses"]
    assert "champion_error" in spec["components"]["schemas"]["ServedModel"]["properties"]
    assert "problems" in spec["components"]["schemas"]["HealthResponse"]["properties"]


def test_health_is_503_when_the_champion_alias_moved_to_a_version_that_cannot_load():
    backend = StubPredictors()
    predictor = backend.predictors["next_item"]
    source = BrokenSource("1")
    watcher = ModelWatcher(predictor, source)
    watcher.poll_once()
    app = _app(backend)
    assert send(app, "GET", "/healthz")[0] == 200
    source.version, source.broken = "2", {"2"}  # promoted, but its files are gone
    watcher.poll_once()
    assert predictor.served.champion.version == "1"  # still answering with the last good version
    assert send(app, "POST", RECS, b'{"user_id": 1}', AUTH)[0] == 200
    status, _, body, _ = send(app, "GET", "/healthz")
    health = strict_json(body)
    assert status == 503 and health["status"] == "degraded" and health["models"][NEXT] == "1"
    assert "version 2" in health["problems"][NEXT] and "/tmp" not in body.decode()
    source.broken = set()  # the files are back: the next poll loads version 2, health recovers
    watcher.poll_once()
    status, _, body, _ = send(app, "GET", "/healthz")
    assert status == 200 and strict_json(body) == {
        "status": "ok",
        "models": {NEXT: "2", PURCHASE: "1"},
        "problems": {},
    }
