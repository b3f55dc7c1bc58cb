"""The feature server other teams call: Feast's HTTP server behind the platform's keys and grants.

``shopsight features serve`` runs Feast's own server (``feast serve``'s gunicorn and FastAPI app), so
Feast's clients, its ``remote`` online store among them, talk to it unchanged. In front of Feast's app:

- ``POST /get-online-features`` needs a team's API key (``Authorization: Bearer KEY``, which Feast's
  clients send with ``auth: {type: oidc, token_env_var: SHOPSIGHT_API_KEY}``, or ``X-API-Key``): 401
  without a known key, 403 naming the feature service (or the features) the team holds no grant on
  (:mod:`shopsight.features.access`), 404 naming the services it may read. The body is checked before
  Feast sees it, so bad input is a 4xx naming the field and row, never Feast's 500 (a string user id):
  400 for what is not JSON, 413 for a body over the limit, 422 for a wrong shape or value.
- ``GET /health`` is open; ``GET /metrics`` (per-team requests, entities and latency) needs a key.
  Every other route of Feast's (push, writes, materialisation) is not served here: the platform's own
  commands write, as the views' owner.
- Every lookup, answered or refused, is one JSON line of ``<data_dir>/feast/reads/reads.jsonl`` (rolled
  daily, UTC): when, which team, which service, how many entities, the status, the milliseconds.

Answers are Feast's: each feature's values, statuses and event timestamps (the feature's time), in order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from shopsight.features.access import Readers
from shopsight.features.packed import PackedStore
from shopsight.platform import Settings
from shopsight.platform.api_keys import authenticate

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

LOOKUP = "/get-online-features"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BYTES_PER_ENTITY = 32  # an int64 id and its separator, with room for spaces


class Refused(ValueError):
    """A request refused before Feast sees it: its status and message."""

    def __init__(self, status: int, message: str, service: str = "-") -> None:
        super().__init__(message)
        self.status, self.service = status, service


def reads_log(settings: Settings) -> Path:
    """The read log: ``<data_dir>/feast/reads/reads.jsonl`` (older days beside it, dated)."""
    return Path(settings.data_dir).absolute() / "feast" / "reads" / "reads.jsonl"


class FeatureServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "shopsight_feature_requests",
            "Feature lookups by team, feature service and status.",
            ["team", "service", "status"],
            registry=self.registry,
        )
        self.entities = Counter(
            "shopsight_feature_entities",
            "Entity rows looked up, by team and feature service.",
            ["team", "service"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "shopsight_feature_request_seconds",
            "Lookup latency in the feature server, by team.",
            ["team"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The metrics of every worker of the server when they share a multiprocess folder
        (``PROMETHEUS_MULTIPROC_DIR``, as ``features serve`` runs them), else this process's."""
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)


class Gateway:
    """An ASGI app: ``feast_app`` behind the keys, grants and checks above."""

    def __init__(self, feast_app, store, settings: Settings) -> None:
        self.feast_app = feast_app
        self.keys = dict(settings.serving.api_keys)
        self.readers = Readers(store)
        self.max_entities = settings.feast.max_entities
        self.max_body_bytes = max(64 * 1024, _BYTES_PER_ENTITY * self.max_entities)
        self.join_keys = {
            key: entity.value_type.name for entity in store.list_entities() for key in [entity.join_key]
        }
        self.metrics = FeatureServerMetrics()
        self.log = _read_logger(reads_log(settings))
        online = store._get_provider().online_store
        self.packed = PackedAnswers(store, online) if isinstance(online, PackedStore) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.feast_app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/health" and method == "GET":
            await self.feast_app(scope, receive, send)
        elif path == "/metrics" and method == "GET":
            if authenticate(_headers(scope), self.keys) is None:
                await _send_json(send, 401, _unauthorized(_headers(scope)), bearer=True)
                return
            await _send(send, 200, self.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == LOOKUP and method == "POST":
            await self._lookup(scope, receive, send)
        else:
            await _send_json(
                send,
                404,
                {
                    "error": f"no route {method} {path}",
                    "detail": f"this server answers POST {LOOKUP}, GET /health and GET /metrics",
                },
            )

    async def _lookup(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = _headers(scope)
        team = authenticate(headers, self.keys)
        service, entities, status = "-", 0, 500
        try:
            if team is None:
                status = 401
                await _send_json(send, 401, _unauthorized(headers), bearer=True)
                return
            body = await self._body(scope, receive)
            service, entities = self._check(team, body)
            answer = self.packed.answer(json.loads(body)) if self.packed else None
            if answer is not None:
                status = 200
                await _send(send, 200, answer, "application/json")
                return
            replay = _replay(body)

            async def watched(message: MutableMapping[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            # the body is JSON whatever its Content-Type says (`curl -d` says a form): Feast's app reads it so
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            as_json = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            await self.feast_app(as_json, replay, watched)
        except Refused as refused:
            status, service = refused.status, refused.service
            await _send_json(send, refused.status, {"error": str(refused)}, bearer=refused.status == 401)
        finally:
            seconds = time.perf_counter() - started
            who = team or "-"
            self.metrics.requests.labels(who, service, str(status)).inc()
            self.metrics.latency.labels(who).observe(seconds)
            if status == 200:
                self.metrics.entities.labels(who, service).inc(entities)
            self.log.info(
                json.dumps(
                    {
                        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                        "team": who,
                        "service": service,
                        "entities": entities,
                        "status": status,
                        "ms": round(seconds * 1000, 3),
                    }
                )
            )

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _headers(scope).get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise Refused(413, self._too_large())
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise Refused(413, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _too_large(self) -> str:
        return f"body over {self.max_body_bytes:,} bytes (at most {self.max_entities:,} entities a lookup)"

    def _check(self, team: str, body: bytes) -> tuple[str, int]:
        """(what the request reads, how many entities) if ``team`` may send it; else Refused."""
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refused(400, f"the body is not JSON: {exc}") from None
        if not isinstance(request, dict):
            raise Refused(422, "the body must be a JSON object with 'entities' and 'feature_service'")
        entities = self._entities(request.get("entities"))
        service, features = request.get("feature_service"), request.get("features")
        if (service is None) == (features is None):
            raise Refused(422, "send exactly one of 'feature_service' (a name) and 'features' (a list)")
        if service is not None:
            if not isinstance(service, str):
                raise Refused(422, f"'feature_service' must be a name, not {_preview(service)}")
            known = self.readers.services()
            if service not in known:
                readable = [s for s in known if self.readers.may_read(team, s)]
                readable = ", ".join(readable) or "none"
                raise Refused(404, f"no feature service {service!r}; {team} may read: {readable}", "-")
            if not self.readers.may_read(team, service):
                raise Refused(
                    403,
                    f"{team} may not read feature service {service!r}: its owner grants reads "
                    f"(`shopsight features grant {team} {service}`)",
                    service,
                )
            return service, entities
        if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
            raise Refused(422, "'features' must be a non-empty list of 'view:feature' names")
        missing, givers = self.readers.covering(team, features)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            where = f"; they are in {', '.join(givers)}" if givers else "; no feature service holds them"
            raise Refused(
                403, f"{team} may not read {shown}: no service granted to it holds them{where}", "features"
            )
        return "features", entities

    def _entities(self, entities: Any) -> int:
        """The number of entity rows; Refused (422) naming the key and row of what is wrong."""
        if not isinstance(entities, dict) or not entities:
            raise Refused(
                422, "'entities' must be an object: join key -> list of values, e.g. {\"user_id\": [1]}"
            )
        rows = None
        for key, values in entities.items():
            kind = self.join_keys.get(key)
            if kind is None:
                known = ", ".join(sorted(self.join_keys))
                raise Refused(422, f"unknown join key {key!r} in 'entities'; known: {known}")
            if not isinstance(values, list) or not values:
                raise Refused(422, f"entities.{key} must be a non-empty list")
            for row, value in enumerate(values):
                if not _fits(kind, value):
                    raise Refused(
                        422,
                        f"entities.{key}[{row}] is {_preview(value)}: {key} takes {_KINDS.get(kind, kind)}",
                    )
            if rows is not None and len(values) != rows:
                raise Refused(422, f"entities.{key} has {len(values)} values, the other keys {rows}")
            rows = len(values)
        if rows > self.max_entities:
            raise Refused(422, f"{rows:,} entities in one lookup; at most {self.max_entities:,}")
        return rows


class PackedAnswers:
    """Lookups of a feature service answered straight from a packed online store, in Feast's JSON: what
    Feast's app would answer, without building and converting thousands of protobuf values. Requests it
    does not cover (feature lists, full feature names, services over several join keys) return None, and
    Feast's app answers them."""

    def __init__(self, store, online: PackedStore, ttl_s: float = 5.0) -> None:
        self.store, self.online, self.ttl_s = store, online, ttl_s
        self._plans: dict[str, tuple[float, Any]] = {}

    def _plan(self, service: str):
        """(join key, [(view, [feature names])]) of a service, read again from the registry every ttl_s."""
        cached = self._plans.get(service)
        if cached and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        fs = self.store.get_feature_service(service, allow_cache=True)
        views, keys = [], set()
        for projection in fs.feature_view_projections:
            view = self.store.get_feature_view(projection.name)
            keys.update(view.join_keys)
            views.append((view, [f.name for f in projection.features]))
        plan = (keys.pop(), views) if len(keys) == 1 else None
        self._plans[service] = (time.monotonic(), plan)
        return plan

    def answer(self, request: dict) -> bytes | None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        service, entities = request.get("feature_service"), request["entities"]
        if (
            not service
            or request.get("full_feature_names")
            or request.get("include_feature_view_version_metadata")
        ):
            return None
        plan = self._plan(service)
        if plan is None or set(entities) != {plan[0]}:
            return None
        join_key, views = plan
        ids = entities[join_key]
        if not all(isinstance(i, int) for i in ids):  # keyed by int64 here; Feast's app answers the rest
            return None
        entity_keys = [EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=i)]) for i in ids]
        keys = self.online.serialized_keys(self.store.config, entity_keys)
        epoch = ["1970-01-01T00:00:00Z"] * len(ids)
        names = [join_key]
        results = [{"values": ids, "statuses": ["PRESENT"] * len(ids), "event_timestamps": epoch}]
        read = self.online.read_views(self.store.config, [view for view, _ in views], keys)
        for (_, features), rows in zip(views, read, strict=True):
            stamps = [epoch[0] if row is None else _timestamp(row[0]) for row in rows]
            statuses = ["NOT_FOUND" if row is None else "PRESENT" for row in rows]  # a null is PRESENT too
            for name in features:
                values = [None if row is None else row[1].get(name) for row in rows]
                names.append(name)
                results.append({"values": values, "statuses": statuses, "event_timestamps": stamps})
        answer = {"results": results, "metadata": {"feature_names": names}}
        try:
            return json.dumps(answer, allow_nan=False).encode()
        except ValueError:  # NaN or infinity: strings, as Feast's JSON writes them (no JSON number can)
            for result in results:
                result["values"] = [_finite(value) for value in result["values"]]
            return json.dumps(answer, allow_nan=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _timestamp(micros: int) -> str:
    """As Feast's JSON writes a protobuf Timestamp: RFC 3339 in UTC, fractions only when there are any."""
    seconds, fraction = divmod(micros, 1_000_000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{fraction:06d}Z" if fraction else f"{text}Z"


_KINDS = {"INT64": "whole numbers", "INT32": "whole numbers", "STRING": "strings"}


def _fits(kind: str, value: Any) -> bool:
    if kind in ("INT64", "INT32"):
        bound = 2**63 if kind == "INT64" else 2**31
        return isinstance(value, int) and not isinstance(value, bool) and -bound <= value < bound
    if kind == "STRING":
        return isinstance(value, str)
    return value is not None


def _preview(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _unauthorized(headers: dict[str, str]) -> dict[str, str]:
    reason = "wrong API key" if ("x-api-key" in headers or "authorization" in headers) else "missing API key"
    return {"error": f"{reason}: send Authorization: Bearer <key> or X-API-Key: <key>"}


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _send_json(send: Send, status: int, body: dict, *, bearer: bool = False) -> None:
    extra = [(b"www-authenticate", b"Bearer")] if bearer else []
    await _send(send, status, json.dumps(body).encode(), "application/json", extra)


async def _send(send: Send, status: int, body: bytes, content_type: str, extra=()) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _read_logger(path: Path) -> logging.Logger:
    """A logger writing bare lines to ``path``, rolled at midnight UTC (the old day's file dated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"shopsight.feature_reads.{path}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = TimedRotatingFileHandler(path, when="midnight", utc=True, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger
