"""The Ray Serve application: a thin shell around :mod:`shopsight.serving.predictor` and
:mod:`shopsight.serving.app`.

Every model lives in a :class:`ModelHost`: the feature reader
(:class:`~shopsight.features.online.OnlineFeatureReader`), the predictor, and a background thread that
re-resolves the registry aliases every ``serving.poll_interval_s`` and swaps a new version in once it is
loaded, so a promotion reaches serving within seconds, with no redeployment and no dropped request.
Requests are scored in batches (``@serve.batch``). Two layouts (``serving.layout``):

- ``combined`` (default): one deployment, ``api``, is the FastAPI ingress and holds both model hosts.
  Proxy -> replica -> proxy: one Ray call per request. On a small machine this is the fast one (the
  benchmark measures both).
- ``split``: the ingress ``api`` (auth, validation, metrics) calls two model deployments, ``next_item`` and
  ``purchase``, by handle: they scale apart (e.g. GPU model replicas behind a CPU ingress), at the cost of
  a second Ray call per request.

Replicas, CPUs/GPUs per replica, autoscaling, ``max_ongoing_requests`` and the HTTP address come from
``serving.*``. The routing (canary share, shadow, seed), the batch size and wait and the poll interval are
the deployments' ``user_config``: deploying again with only those changed reconfigures the running replicas
in place (Ray Serve's lightweight update) instead of restarting them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import threading
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shopsight import __version__
from shopsight.platform import Settings, ShopsightError
from shopsight.platform._settings import ServingSettings
from shopsight.serving.predictor import (
    NEXT_ITEM_SERVICE,
    PURCHASE_SERVICE,
    ModelWatcher,
    PropensityPredictor,
    RecommendationPredictor,
    Routing,
)

# Ray Serve 2.60's own config models use a pydantic idiom pydantic deprecates: not ours to act on
warnings.filterwarnings(
    "ignore", message="Using extra keyword arguments on `Field`", module=r"ray\.serve\..*"
)
from ray import serve  # noqa: E402

NEXT_ITEM_MODEL = "shopsight-next-item"  # = shopsight.training.train.NEXT_ITEM_MODEL
PURCHASE_MODEL = "shopsight-purchase"  # = shopsight.training.train_purchase.PURCHASE_MODEL
USER_CONFIG_KEYS = (
    "canary_share",
    "shadow",
    "routing_seed",
    "max_batch_size",
    "batch_wait_timeout_s",
    "poll_interval_s",
)


def _replica_setup(settings: Settings) -> None:
    import torch

    # one replica, its reserved CPUs: torch's default (every core) would fight the other replicas
    torch.set_num_threads(max(1, int(settings.serving.num_cpus)))


class ModelHost:
    """One model in a replica: feature reader, predictor, alias watcher (started, champion loaded)."""

    def __init__(self, settings: Settings, kind: str) -> None:
        from shopsight.features.online import OnlineFeatureReader
        from shopsight.serving.models import MlflowModelSource, item_popularity

        routing = _routing(settings.serving)
        uri = settings.mlflow.tracking_uri
        if kind == "next_item":
            reader = OnlineFeatureReader(settings, NEXT_ITEM_SERVICE, ["seq_item_ids"])
            self.predictor: Any = RecommendationPredictor(reader, NEXT_ITEM_MODEL, routing)
            source = MlflowModelSource(uri, NEXT_ITEM_MODEL, "next_item", item_popularity(settings))
        else:
            reader = OnlineFeatureReader(settings, PURCHASE_SERVICE)
            self.predictor = PropensityPredictor(reader, PURCHASE_MODEL, routing)
            source = MlflowModelSource(uri, PURCHASE_MODEL, "purchase")
        self.watcher = ModelWatcher(self.predictor, source, settings.serving.poll_interval_s)
        self.watcher.poll_once()  # the replica is ready once the champion (if any) is loaded
        self.watcher.start()

    def configure(self, config: dict, batch) -> None:
        """Apply a user_config: routing, the batch method's size and wait, the poll interval."""
        routing = Routing(
            canary_share=float(config.get("canary_share", 0.0)),
            shadow=bool(config.get("shadow", False)),
            seed=int(config.get("routing_seed", 0)),
        )
        needs_load = routing.needs_challenger != self.predictor.routing.needs_challenger
        self.predictor.set_routing(routing)
        if "max_batch_size" in config:
            batch.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            batch.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))
        if "poll_interval_s" in config:
            self.watcher.interval_s = float(config["poll_interval_s"])
        if needs_load:  # load or drop the challenger now rather than at the next poll
            threading.Thread(target=self.watcher.poll_once, daemon=True).start()

    def stop(self) -> None:
        self.watcher.stop()


def _steady() -> None:
    gc.collect()
    gc.freeze()  # a steady tail: the collector stops walking the loaded registry and models


@serve.deployment(max_constructor_retry_count=2)
@serve.ingress()
class Combined:
    """Layout ``combined``: the HTTP API and both models in one replica."""

    def __init__(self, settings: Settings) -> None:
        _replica_setup(settings)
        self.serving = settings.serving
        self.next_item = ModelHost(settings, "next_item")
        self.purchase = ModelHost(settings, "purchase")
        _steady()

    def reconfigure(self, config: dict) -> None:
        self.next_item.configure(config, self.recommend)
        self.purchase.configure(config, self.propensity)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def recommend(self, requests: list) -> list:
        return self.next_item.predictor.recommend(requests)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def propensity(self, requests: list) -> list:
        return self.purchase.predictor.propensity(requests)

    def describe(self, kind: str):
        return (self.next_item if kind == "next_item" else self.purchase).predictor.describe()

    def __serve_build_asgi_app__(self):
        return _app(self.serving, _ReplicaBackend(self))

    def __del__(self) -> None:
        for host in (getattr(self, "next_item", None), getattr(self, "purchase", None)):
            if host is not None:
                host.stop()


class _ReplicaBackend:
    """The combined replica's own batched methods, as the app's backend."""

    def __init__(self, replica: Combined) -> None:
        self.replica = replica

    async def recommend(self, request):
        return await self.replica.recommend(request)

    async def propensity(self, request):
        return await self.replica.propensity(request)

    async def models(self):
        from shopsight.serving.schemas import ModelsResponse

        return ModelsResponse(
            next_item=self.replica.describe("next_item"), purchase=self.replica.describe("purchase")
        )


class _ModelDeployment:
    """Layout ``split``: one model per deployment."""

    kind = ""
    host: ModelHost

    def _start(self, settings: Settings) -> None:
        _replica_setup(settings)
        self.host = ModelHost(settings, self.kind)
        _steady()

    def describe(self, kind: str | None = None):
        return self.host.predictor.describe()

    def __del__(self) -> None:
        host = getattr(self, "host", None)
        if host is not None:
            host.stop()


@serve.deployment(max_constructor_retry_count=2)
class NextItemModel(_ModelDeployment):
    """Recommendations: next_item_v1 features, the shopsight-next-item champion, popularity fallback."""

    kind = "next_item"

    def __init__(self, settings: Settings) -> None:
        self._start(settings)

    def reconfigure(self, config: dict) -> None:
        self.host.configure(config, self.score)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def score(self, requests: list) -> list:
        return self.host.predictor.recommend(requests)

    async def recommend(self, request):
        return await self.score(request)


@serve.deployment(max_constructor_retry_count=2)
class PurchaseModel(_ModelDeployment):
    """Purchase propensity: purchase_propensity_v1 features, the shopsight-purchase champion."""

    kind = "purchase"

    def __init__(self, settings: Settings) -> None:
        self._start(settings)

    def reconfigure(self, config: dict) -> None:
        self.host.configure(config, self.score)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def score(self, requests: list) -> list:
        return self.host.predictor.propensity(requests)

    async def propensity(self, request):
        return await self.score(request)


class ServeBackend:
    """The split ingress's backend: the model deployments, by handle."""

    def __init__(self, next_item, purchase) -> None:
        self.next_item = next_item
        self.purchase = purchase

    async def recommend(self, request):
        return await self.next_item.recommend.remote(request)

    async def propensity(self, request):
        return await self.purchase.propensity.remote(request)

    async def models(self):
        import asyncio

        from shopsight.serving.schemas import ModelsResponse

        next_item, purchase = await asyncio.gather(
            self.next_item.describe.remote(), self.purchase.describe.remote()
        )
        return ModelsResponse(next_item=next_item, purchase=purchase)


@serve.deployment(max_constructor_retry_count=2)
@serve.ingress()
class Api:
    """Layout ``split``: the HTTP ingress over the model deployments."""

    def __init__(self, serving: ServingSettings, next_item, purchase) -> None:
        self.serving = serving
        self.backend = ServeBackend(next_item, purchase)

    def __serve_build_asgi_app__(self):
        return _app(self.serving, self.backend)


def _app(serving: ServingSettings, backend):
    from shopsight.serving.app import build_app

    return build_app(
        backend, serving.api_keys, max_user_ids=serving.max_user_ids, metrics_open=serving.metrics_open
    )


def _routing(serving: ServingSettings) -> Routing:
    return Routing(canary_share=serving.canary_share, shadow=serving.shadow, seed=serving.routing_seed)


def replica_settings(settings: Settings) -> Settings:
    """The settings as replicas need them: an absolute data directory (a replica's working directory is
    not the caller's) and a concrete tracking URI (a replica must not start an MLflow server)."""
    from shopsight.platform.mlflow_server import tracking_uri

    settings = settings.model_copy(update={"data_dir": Path(settings.data_dir).absolute()})
    uri = tracking_uri(settings)
    return settings.model_copy(update={"mlflow": settings.mlflow.model_copy(update={"tracking_uri": uri})})


def user_config(serving: ServingSettings, **overrides) -> dict:
    """The part of the settings a running replica takes without restarting; ``overrides`` win."""
    unknown = set(overrides) - set(USER_CONFIG_KEYS)
    if unknown:
        raise ShopsightError(f"not a reconfigurable serving setting: {', '.join(sorted(unknown))}")
    config = {key: getattr(serving, key) for key in USER_CONFIG_KEYS}
    config.update({k: v for k, v in overrides.items() if v is not None})
    try:
        ServingSettings.model_validate({**serving.model_dump(), **config})  # bounds of canary_share etc.
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ShopsightError(f"invalid serving setting: {problems}") from None
    return config


def _code_version(settings: Settings) -> str:
    """Replicas restart when this changes: Shopsight's code (what a replica imports: the serving package,
    the feature reader, the models), or a setting that is not in ``user_config``."""
    digest = hashlib.sha256(__version__.encode())
    root = Path(str(resources.files("shopsight")))
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    values = settings.model_dump(mode="json")
    for key in USER_CONFIG_KEYS:
        values["serving"].pop(key)
    digest.update(json.dumps(values, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def build_application(settings: Settings, **routing):
    """The bound application (``serve.run`` it). ``routing``: user_config overrides (canary_share, shadow,
    routing_seed, max_batch_size, batch_wait_timeout_s, poll_interval_s)."""
    serving = settings.serving
    config = user_config(serving, **routing)
    version = _code_version(settings)
    scale: dict[str, Any] = {"num_replicas": serving.replicas}
    if serving.autoscaling is not None:
        auto = serving.autoscaling
        scale = {
            "autoscaling_config": {
                "min_replicas": auto.min_replicas,
                "max_replicas": auto.max_replicas,
                "target_ongoing_requests": auto.target_ongoing_requests,
            }
        }
    model_options = {
        "ray_actor_options": {"num_cpus": serving.num_cpus, "num_gpus": serving.num_gpus},
        "max_ongoing_requests": max(serving.max_ongoing_requests, int(config["max_batch_size"])),
        "user_config": config,
        **scale,
    }
    if serving.layout == "combined":
        return _options(Combined, version, name="api", **model_options).bind(settings)
    next_item = _options(NextItemModel, version, name="next_item", **model_options).bind(settings)
    purchase = _options(PurchaseModel, version, name="purchase", **model_options).bind(settings)
    return _options(
        Api,
        version,
        name="api",
        num_replicas=serving.ingress_replicas,
        ray_actor_options={"num_cpus": serving.ingress_num_cpus},
        max_ongoing_requests=4 * serving.max_ongoing_requests,
    ).bind(serving, next_item, purchase)


def _options(deployment, version: str, **options):
    """``deployment.options(...)`` with a code version.

    ``serve.run`` gives every deployment a random code version unless one is set, and a new code version
    restarts every replica; Ray 2.60 only lets Serve itself set one (``_internal``). Passing a content hash
    (the serving code and the settings that are not user_config) keeps a redeploy that changes only
    user_config a lightweight update, as Serve's declarative config path does. Should a later Ray refuse
    it, the deployment still works, with restarts.
    """
    configured = deployment.options(**options)
    try:
        return configured.options(version=version, _internal=True)
    except (TypeError, ValueError):
        return configured


@dataclass(frozen=True)
class Deployed:
    url: str
    docs: str
    app_name: str


def deploy(settings: Settings, *, log_level: str = "INFO", **routing) -> Deployed:
    """Deploy (or update in place) the application on the connected Ray cluster; returns once every
    replica is up, each with its champion loaded when one exists. ``log_level``: of Serve's and the
    replicas' logs (the demo keeps only warnings: its Ray prints every log line to the console).

    Raises:
        ShopsightError: Ray is not connected, or a deployment failed to start (the message says why).
    """
    import ray

    if not ray.is_initialized():
        raise ShopsightError("Ray is not connected: call ray.init() (the CLI does) before deploying")
    settings = replica_settings(settings)
    serving = settings.serving
    logging_config = {"log_level": log_level}
    serve.start(http_options={"host": serving.host, "port": serving.port}, logging_config=logging_config)
    try:
        serve.run(
            build_application(settings, **routing),
            name=serving.app_name,
            route_prefix="/",
            logging_config=logging_config,
        )
    except RuntimeError as exc:
        raise ShopsightError(f"serving failed to start: {str(exc).strip().splitlines()[-1][:500]}") from None
    url = f"http://{serving.host}:{serving.port}"
    return Deployed(url=url, docs=f"{url}/docs", app_name=serving.app_name)


def status(settings: Settings) -> dict:
    """The application's status, its deployments' replicas and the model versions they serve.

    Raises:
        ShopsightError: nothing is deployed under ``serving.app_name``.
    """
    app_name = settings.serving.app_name
    overview = serve.status().applications.get(app_name)
    if overview is None:
        raise ShopsightError(f"no serving application {app_name!r} is deployed (`shopsight serve deploy`)")
    deployments = {
        name: {
            "status": str(getattr(d.status, "value", d.status)),
            "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
            "message": d.message,
        }
        for name, d in overview.deployments.items()
    }
    served = {}
    for name in ("next_item", "purchase"):
        deployment = name if name in overview.deployments else "api"  # split | combined
        try:
            handle = serve.get_deployment_handle(deployment, app_name=app_name)
            served[name] = handle.describe.remote(name).result(timeout_s=10).model_dump(mode="json")
        except Exception as exc:  # noqa: BLE001 - report what can be reported
            served[name] = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    return {
        "application": app_name,
        "status": str(getattr(overview.status, "value", overview.status)),
        "message": overview.message,
        "deployments": deployments,
        "served": served,
    }


def shutdown(settings: Settings) -> bool:
    """Delete the application (and stop Serve when nothing else runs in it); returns whether one ran."""
    app_name = settings.serving.app_name
    apps = serve.status().applications
    if app_name not in apps:
        return False
    serve.delete(app_name)
    if not (set(apps) - {app_name}):
        serve.shutdown()
    return True


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder for config files (a RayService's ``serveConfigV2``):
    ``import_path: shopsight.serving.deploy:app_builder`` with ``args: {profile: cluster}``; the rest of
    the settings come from the environment (``SHOPSIGHT_*``), as everywhere else."""
    from shopsight.platform import load_settings

    return build_application(load_settings(profile=args.get("profile")).settings)
