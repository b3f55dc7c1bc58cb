"""The HTTP API (FastAPI): routes, API keys, error bodies, Prometheus metrics, OpenAPI docs at ``/docs``.

:func:`build_app` takes a *backend* that answers typed requests with :class:`Outcome` objects: in Ray
Serve, handles to the model deployments (:mod:`shopsight.serving.deploy`); in tests or one process,
:class:`LocalBackend` over the predictors. The app itself knows nothing of Ray.

Routes: one ``POST`` route per served task, from the task table (``Task.route``: e.g.
``/v1/recommendations``, ``/v1/purchase-propensity``), and ``GET /v1/models`` (API key needed);
``GET /healthz`` (open), ``GET /metrics`` (with an API key like ``/v1``, since it names the teams, unless
``serving.metrics_open``), ``/docs`` and ``/openapi.json`` (open).

API keys: ``serving.api_keys`` maps a team to the sha256 hex digest of its key, so the settings never hold
a key itself. A request sends the key as ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``; its digest is
compared with every team's by :func:`hmac.compare_digest`. The check runs before the body is read, so a
request without a valid key gets 401 whatever it sends. With no keys configured every keyed route is 401.

Limits, checked before the key: request headers over ``max_header_bytes`` (16 KiB) are a 431, a body
whose ``Content-Length`` is over ``max_body_bytes`` a 413 before a byte of it is read; a body sent without
one (chunked) is counted as it arrives and is a 413 the moment it passes the limit. Bodies are JSON
whatever their Content-Type, parsed strictly (:mod:`shopsight.serving.bodies`); every 4xx the app sends
is ``{"error": ..., "detail": ...}``, echoing at most a short preview of the input.

Metrics are recorded here, in the ingress, from what the model deployments return (versions, fallbacks,
stage timings, shadow agreement), into :class:`~shopsight.serving.metrics.ServingMetrics`: a registry of
this process, or under Ray Serve Ray's metrics, summed over every ingress replica when ``/metrics`` is
read (so every scrape agrees whichever replica answers it).
"""

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer

from shopsight import __version__
from shopsight.platform.api_keys import authenticate
from shopsight.serving.bodies import JsonBodyRoute, error_details
from shopsight.serving.metrics import CONTENT_TYPE, ServingMetrics
from shopsight.serving.prediction_log import PredictionLog, RequestContext, answer_logged, new_request_id
from shopsight.serving.predictor import PREDICTORS, Outcome, ProbabilityPredictor
from shopsight.serving.schemas import (
    ErrorResponse,
    HealthResponse,
    ServedModel,
    models_response_model,
    propensity_request_model,
)
from shopsight.training.tasks import Task, get_task

log = logging.getLogger("shopsight.serving")

MODELS = "/v1/models"
KEYED_PREFIX = "/v1/"
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
# Ray's errors of a service that is busy or restarting, named so that the app needs no Ray: a 503, not a 500
_RETRYABLE = frozenset(
    ("BackPressureError", "DeploymentUnavailableError", "ActorDiedError", "ActorUnavailableError")
)
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces


class Backend(Protocol):
    """What the routes call: the served tasks, one :class:`Outcome` per request, the served versions."""

    tasks: tuple[str, ...]

    async def answer(self, task: str, request, context: RequestContext | None = None) -> Outcome: ...

    async def models(self) -> dict[str, ServedModel]: ...


class LocalBackend:
    """Predictors in this process (task name -> predictor), one request at a time (tests; no Ray), with
    their answers logged to ``answers_log`` when one is given."""

    def __init__(self, predictors: Mapping, answers_log: PredictionLog | None = None) -> None:
        self.predictors = dict(predictors)
        self.tasks = tuple(self.predictors)
        self.answers_log = answers_log
        for predictor in self.predictors.values():
            predictor.log_answers = answers_log is not None

    async def answer(self, task: str, request, context: RequestContext | None = None) -> Outcome:
        return answer_logged(self.predictors[task], task, self.answers_log, [request], [context])[0]

    async def models(self) -> dict[str, ServedModel]:
        return {task: predictor.describe() for task, predictor in self.predictors.items()}


def default_body_limit(max_user_ids: int) -> int:
    """The default cap on a request body: 64 KiB, or more when ``max_user_ids`` int64 ids need it (up to
    20 characters and a separator each: 32 bytes leaves room for spaces).

    Small on purpose: parsing and validating a body holds the GIL (a thread would not free the event
    loop: the C parser never yields it), so the largest body is the longest stall of every request in the
    replica. 1 MiB of ``[1,1,...]`` took ~35 ms to parse and validate on the 2-vCPU VM; 64 KiB ~2 ms;
    ``serving.max_user_ids`` at its bound (10,000) gives 320 KiB.
    """
    return max(64 * 1024, 32 * max_user_ids)


class _Gate:
    """ASGI middleware: header and declared body size limits and the API key check (all before the body
    is read), and per-request metrics."""

    def __init__(
        self,
        app,
        keys: Mapping[str, str],
        metrics: ServingMetrics,
        metrics_open: bool,
        endpoints: tuple,
        max_header_bytes: int,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.endpoints = endpoints
        self.keys = dict(keys)
        self.metrics = metrics
        self.metrics_open = metrics_open
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"
        status = [500]
        team = "-"
        # the HTTP server (uvicorn with httptools under Ray Serve) sets no limit on headers it can be told
        # of: they are counted here, before anything reads them
        header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if header_bytes > self.max_header_bytes:
            message = (
                f"request headers of {header_bytes} bytes: over the limit of {self.max_header_bytes} bytes"
            )
            await _send_json(send, 431, {"error": message})
            self._record(endpoint, 431, team, started)
            return
        if _content_length(scope) > self.max_body_bytes:  # declared too large: refused unread
            await _send_json(send, 413, {"error": _too_large(self.max_body_bytes)})
            self._record(endpoint, 413, team, started)
            return
        if path.startswith(KEYED_PREFIX) or (path == "/metrics" and not self.metrics_open):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            team = authenticate(headers, self.keys)
            if team is None:
                reason = (
                    "missing API key"
                    if not ("x-api-key" in headers or "authorization" in headers)
                    else "wrong API key"
                )
                message = f"{reason}: send X-API-Key: <key> or Authorization: Bearer <key>"
                await _send_json(send, 401, {"error": message}, [(b"www-authenticate", b"Bearer")])
                self._record(endpoint, 401, "-", started)
                return

        request_id, sent_one = _request_id(scope)
        scope.setdefault("state", {}).update(team=team, request_id=request_id)

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if not sent_one:  # else it is the client's own, or Ray Serve's proxy's, which echoes it
                    message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(endpoint, status[0], team, started)

    def _record(self, endpoint: str, status: int, team: str, started: float) -> None:
        self.metrics.requests.labels(endpoint, str(status), team).inc()
        self.metrics.latency.labels(endpoint, team).observe(time.perf_counter() - started)


def monitor_metrics_file(data_dir: Path) -> Path:
    """Where ``shopsight monitor`` leaves its gauges, which ``/metrics`` appends."""
    return Path(data_dir).absolute() / "monitor" / "monitor.prom"


def _monitor_gauges(path: Path | None) -> bytes:
    """The monitor's last gauges, as it wrote them (a whole file: it writes a temporary one and renames
    it); nothing when it has not run."""
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _request_id(scope) -> tuple[str, bool]:
    """The request's id and whether it came with the request: the client's ``X-Request-Id`` when it is a
    plain token (a retry keeps its id, so the monitor counts the request once) or the one Ray Serve's proxy
    gives every request, else a new one."""
    for name, value in scope["headers"]:
        if name.lower() == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return value.decode(), True
    return new_request_id(), False


def _content_length(scope) -> int:
    """The declared body size; 0 when not declared (the body is then counted as it arrives)."""
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else 0  # the HTTP server refuses a malformed one
    return 0


def _too_large(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes"


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


_ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key."},
    413: {"model": ErrorResponse, "description": "The request body is over the size limit."},
    422: {
        "model": ErrorResponse,
        "description": "The body is not JSON (not UTF-8, NaN or Infinity, a lone surrogate, nested too "
        "deeply, ...) or does not match the schema: `error` names the field, `detail` lists every problem "
        "with a short preview of the input.",
    },
    431: {"model": ErrorResponse, "description": "The request headers are over the size limit."},
    503: {"model": ErrorResponse, "description": "No champion model is loaded yet, or the service is busy."},
}


def build_app(
    backend: Backend,
    api_keys: Mapping[str, str],
    *,
    max_user_ids: int = 100,
    metrics_open: bool = False,
    metrics: ServingMetrics | None = None,
    monitor_metrics: Path | None = None,
    timeout_s: float = 30.0,
    max_body_bytes: int | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> FastAPI:
    """The FastAPI app of the serving API over ``backend``.

    Args:
        api_keys: team -> sha256 hex of its key (``serving.api_keys``).
        max_user_ids: most users in one propensity request (``serving.max_user_ids``).
        metrics_open: serve ``/metrics`` without an API key.
        monitor_metrics: the monitor's gauges (``shopsight monitor`` writes them in Prometheus's text
            format), appended to ``/metrics`` when the file exists: one scrape target has both.
        timeout_s: a backend answer slower than this is a 503.
        max_body_bytes: larger request bodies are a 413 (default: :func:`default_body_limit`).
        max_header_bytes: larger request headers (names and values, all together) are a 431.
    """
    metrics = metrics or ServingMetrics.local()
    max_body_bytes = default_body_limit(max_user_ids) if max_body_bytes is None else max_body_bytes
    tasks = [get_task(name) for name in backend.tasks]
    models_response = models_response_model(tuple(task.name for task in tasks))
    app = FastAPI(
        title="Shopsight serving API",
        version=__version__,
        description="Predictions of the champion models ("
        + "; ".join(f"`{t.route.path}`: {t.route.summary.lower()}" for t in tasks)
        + "), with live features from the Feast online store. Send your team's key as `X-API-Key` (or "
        "`Authorization: Bearer`). Every answer names the model version that produced it.",
        redoc_url=None,
    )
    app.state.metrics = metrics
    app.state.max_body_bytes = max_body_bytes
    keyed = [
        Security(APIKeyHeader(name="X-API-Key", auto_error=False, description="Your team's API key.")),
        Security(HTTPBearer(auto_error=False, description="The API key as a bearer token.")),
    ]

    async def call(endpoint: str, coroutine) -> Response:
        try:
            outcome = await asyncio.wait_for(coroutine, timeout_s)
        except TimeoutError:
            return _error(503, f"no answer within {timeout_s:g} s: the service is overloaded, retry later")
        except Exception as exc:  # noqa: BLE001 - Ray's back-pressure and unavailable replicas: retryable
            if type(exc).__name__ in _RETRYABLE:
                return _error(503, f"the service is busy or restarting ({type(exc).__name__}), retry later")
            raise
        metrics.outcome(endpoint, outcome)
        if outcome.status != 200:
            return _error(outcome.status, outcome.error or "unavailable")
        return Response(
            content=outcome.response.model_dump_json(),
            media_type="application/json",
            headers={"Server-Timing": _server_timing(outcome)},
        )

    for task in tasks:
        _add_route(app, task, call, backend, keyed, max_user_ids, max_body_bytes)

    @app.get(MODELS, response_model=models_response, responses=_ERRORS, dependencies=keyed,
             summary="The model versions being served")  # fmt: skip
    async def models():
        answer = await backend.models()
        for served in answer.values():
            for alias in ("champion", "challenger"):
                version = getattr(served, alias)
                if version is not None:
                    metrics.version(served.name, alias, version.version)
        return models_response(**answer)

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness, and whether champions are loaded",
             responses={503: {"model": HealthResponse, "description": "Degraded: `problems` says which "
                              "model has no loadable champion, and why."}})  # fmt: skip
    async def healthz(response: Response) -> HealthResponse:
        try:
            answer = await asyncio.wait_for(backend.models(), 5.0)
        except Exception as exc:  # noqa: BLE001 - the ingress is alive; say what is not
            log.warning("healthz: models unavailable: %r", exc)
            response.status_code = 503
            return HealthResponse(
                status="degraded", models={}, problems={"*": "the model replicas did not answer"}
            )
        served = {s.name: (s.champion.version if s.champion else None) for s in answer.values()}
        problems = {}
        for s in answer.values():
            # degraded also while an older version still answers: the registry's champion is not served
            if s.champion is None or s.champion_error:
                why = s.champion_error or s.error or "no champion is loaded"
                still = f" (still serving version {s.champion.version})" if s.champion else ""
                problems[s.name] = why + still
        if problems:
            response.status_code = 503
        return HealthResponse(status="degraded" if problems else "ok", models=served, problems=problems)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(await metrics.exposition() + _monitor_gauges(monitor_metrics),
                        media_type=CONTENT_TYPE)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError) -> JSONResponse:
        # the input may be megabytes, NaN or a lone surrogate: only JSON-safe previews go back
        errors = error_details(exc.errors())
        first = errors[0] if errors else {}
        loc = first.get("loc", [])
        where = ".".join(str(p) for p in (loc[1:] if loc[:1] == ["body"] else loc)) or "body"
        message = f"invalid request: {where}: {first.get('msg', 'does not match the schema')}"
        return JSONResponse({"error": message, "detail": errors}, status_code=422)

    @app.exception_handler(413)  # a body sent without Content-Length, counted past the limit as it came
    async def too_large(_request, _exc) -> JSONResponse:
        return _error(413, _too_large(max_body_bytes))

    endpoints = (*(t.route.path for t in tasks), MODELS, "/healthz", "/metrics", "/docs", "/openapi.json")
    app.add_middleware(
        _Gate, keys=api_keys, metrics=metrics, metrics_open=metrics_open, endpoints=endpoints,
        max_header_bytes=max_header_bytes, max_body_bytes=max_body_bytes,
    )  # fmt: skip
    return app


def _add_route(
    app: FastAPI, task: Task, call, backend: Backend, keyed: list, max_user_ids: int, max_body_bytes: int
) -> None:
    """``POST task.route.path``: the task's predictor kind gives the request and response bodies; the body
    is JSON whatever its Content-Type (:class:`JsonBodyRoute`), at most ``max_body_bytes``."""
    predictor = PREDICTORS[task.route.predictor]
    request_model = (
        propensity_request_model(max_user_ids)
        if predictor is ProbabilityPredictor
        else predictor.request_model
    )

    async def route(body, request: Request) -> Response:
        context = RequestContext(request.state.request_id, request.state.team)
        return await call(task.route.path, backend.answer(task.name, body, context))

    route.__annotations__ = {"body": request_model, "request": Request, "return": Response}
    route.__name__ = task.name
    app.router.add_api_route(
        task.route.path,
        route,
        methods=["POST"],
        response_model=predictor.response_model,
        responses=_ERRORS,
        dependencies=keyed,
        summary=f"{task.route.summary}, from the {task.name} champion",
        route_class_override=JsonBodyRoute,
        # counts the bytes of a body sent without Content-Length as they come (Starlette's limiter)
        max_body_size=max_body_bytes,
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _server_timing(outcome: Outcome) -> str:
    parts = [f"{stage};dur={seconds * 1000:.3f}" for stage, seconds in outcome.timings.items()]
    parts.append(f'batch;desc="{outcome.batch_size}"')
    return ", ".join(parts)
