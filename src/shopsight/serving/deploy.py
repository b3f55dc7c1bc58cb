"""The Ray Serve application: a thin shell around :mod:`shopsight.serving.predictor` and
:mod:`shopsight.serving.app`.

Every model lives in a :class:`ModelHost`: the feature reader
(:class:`~shopsight.features.online.OnlineFeatureReader`), the predictor, and a background thread that
re-resolves the registry aliases every ``serving.poll_interval_s`` and swaps a new version in once it is
loaded, so a promotion reaches serving within seconds, with no redeployment and no dropped request.
Requests are scored in batches (``@serve.batch``). Two layouts (``serving.layout``):

- ``combined`` (default): one deployment, ``api``, is the FastAPI ingress and holds a model host per
  served task. Proxy -> replica -> proxy: one Ray call per request. On a small machine this is the fast
  one (the benchmark measures both).
- ``split``: the ingress ``api`` (auth, validation, metrics) calls one model deployment per served task,
  named after it (``next_item``, ``purchase``, ...), by handle: they scale apart (e.g. GPU model replicas
  behind a CPU ingress), at the cost of a second Ray call per request.

The served tasks, their routes, feature services and registered models come from the task table
(:func:`~shopsight.training.tasks.served_tasks`); nothing here names a task.

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
from shopsight.serving.prediction_log import PredictionLog, answer_logged, prediction_log_destination
from shopsight.serving.predictor import PREDICTORS, ModelWatcher, Routing
from shopsight.training.tasks import get_task, served_tasks

# Ray Serve 2.60's own config models use a pydantic idiom pydantic deprecates: not ours to act on
warnings.filterwarnings(
    "ignore", message="Using extra keyword arguments on `Field`", module=r"ray\.serve\..*"
)
from ray import serve  # noqa: E402

USER_CONFIG_KEYS = (
    "prediction_log",
    "canary_share",
    "shadow",
    "routing_seed",
    "max_batch_size",
    "batch_wait_timeout_s",
    "poll_interval_s",
)
# How many replicas run: Ray Serve scales a deployment in place when only these change (no replica restarts)
SCALE_KEYS = ("replicas", "autoscaling", "ingress_replicas")


def _replica_setup(settings: Settings) -> None:
    import torch

    # one replica, its reserved CPUs: torch's default (every core) would fight the other replicas
    torch.set_num_threads(max(1, int(settings.serving.num_cpus)))


class ModelHost:
    """One task's model in a replica: feature reader, predictor, alias watcher (started, champion loaded),
    and the replica's prediction log."""

    def __init__(self, settings: Settings, task_name: str, answers_log: PredictionLog | None = None) -> None:
        from shopsight.features.online import OnlineFeatureReader
        from shopsight.serving.models import MlflowModelSource, item_popularity

        task = get_task(task_name)
        kind = PREDICTORS[task.route.predictor]
        reader = OnlineFeatureReader(settings, task.route.service, kind.features)
        as_of = settings.serving.as_of
        replay = {"clock": lambda: as_of} if as_of is not None else {}
        self.predictor: Any = kind(
            reader, task.registered_model, _routing(settings.serving), endpoint=task.route.path, **replay
        )
        popularity = item_popularity(settings) if kind.kind == "ranking" else None
        source = MlflowModelSource(
            settings.mlflow.tracking_uri, task.registered_model, task.pyfunc.load_class(), popularity
        )
        self.task = task.name
        self.answers_log = answers_log
        self.predictor.log_answers = answers_log is not None and settings.serving.prediction_log
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
        if "prediction_log" in config:
            self.predictor.log_answers = self.answers_log is not None and bool(config["prediction_log"])
        if "max_batch_size" in config:
            batch.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            batch.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))
        if "poll_interval_s" in config:
            self.watcher.interval_s = float(config["poll_interval_s"])
        if needs_load:  # load or drop the challenger now rather than at the next poll
            threading.Thread(target=self.watcher.poll_once, daemon=True).start()

    def answer(self, requests: list, contexts: list) -> list:
        return answer_logged(self.predictor, self.task, self.answers_log, requests, contexts)

    def stop(self) -> None:
        self.watcher.stop()


def _roll_if_turned_off(config: dict, answers_log: PredictionLog) -> None:
    """Turning the log off rolls what is spooled at once: its records reach the log now, not a roll
    interval later, and no conversion of answers logged while it was on runs while it is off."""
    if "prediction_log" in config and not config["prediction_log"]:
        answers_log.roll_or_warn()


def open_prediction_log(settings: Settings) -> PredictionLog:
    """The replica's prediction log: spooled under the data directory, rolled to the configured place."""
    destination, filesystem = prediction_log_destination(settings)
    return PredictionLog(
        Path(settings.data_dir) / "prediction-spool",
        destination,
        settings.serving.prediction_log_roll_s,
        filesystem,
    )


def _steady() -> None:
    gc.collect()
    gc.freeze()  # a steady tail: the collector stops walking the loaded registry and models


async def _answer_grouped(hosts: dict[str, ModelHost], items: list) -> list:
    """A batch of (task, request, context) answered task by task, in the order they came."""
    out: list[Any] = [None] * len(items)
    for name, host in hosts.items():
        rows = [i for i, (task, _, _) in enumerate(items) if task == name]
        if rows:
            answers = host.answer([items[i][1] for i in rows], [items[i][2] for i in rows])
            for i, outcome in zip(rows, answers, strict=True):
                out[i] = outcome
    return out


@serve.deployment(max_constructor_retry_count=2)
@serve.ingress()
class Combined:
    """Layout ``combined``: the HTTP API and every served task's model in one replica."""

    def __init__(self, settings: Settings) -> None:
        _replica_setup(settings)
        self.serving = settings.serving
        self.data_dir = Path(settings.data_dir)
        self.answers_log = open_prediction_log(settings)
        self.hosts = {task.name: ModelHost(settings, task.name, self.answers_log) for task in served_tasks()}
        _steady()

    def reconfigure(self, config: dict) -> None:
        for host in self.hosts.values():
            host.configure(config, self.score)
        _roll_if_turned_off(config, self.answers_log)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def score(self, items: list) -> list:
        return await _answer_grouped(self.hosts, items)

    def describe(self, task: str):
        return self.hosts[task].predictor.describe()

    def __serve_build_asgi_app__(self):
        return _app(self.serving, _ReplicaBackend(self), self.data_dir)

    def __del__(self) -> None:
        for host in getattr(self, "hosts", {}).values():
            host.stop()
        if getattr(self, "answers_log", None) is not None:
            self.answers_log.close()


class _ReplicaBackend:
    """The combined replica's own batched method, as the app's backend."""

    def __init__(self, replica: Combined) -> None:
        self.replica = replica
        self.tasks = tuple(replica.hosts)

    async def answer(self, task: str, request, context=None):
        return await self.replica.score((task, request, context))

    async def models(self):
        return {task: self.replica.describe(task) for task in self.tasks}


@serve.deployment(max_constructor_retry_count=2)
class ModelDeployment:
    """Layout ``split``: one task's model per deployment."""

    def __init__(self, settings: Settings, task: str) -> None:
        _replica_setup(settings)
        self.answers_log = open_prediction_log(settings)
        self.host = ModelHost(settings, task, self.answers_log)
        _steady()

    def reconfigure(self, config: dict) -> None:
        self.host.configure(config, self.score)
        _roll_if_turned_off(config, self.answers_log)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def score(self, items: list) -> list:
        return self.host.answer([request for request, _ in items], [context for _, context in items])

    async def answer(self, request, context=None):
        return await self.score((request, context))

    def describe(self, task: str | None = None):
        return self.host.predictor.describe()

    def __del__(self) -> None:
        host = getattr(self, "host", None)
        if host is not None:
            host.stop()
        if getattr(self, "answers_log", None) is not None:
            self.answers_log.close()


class ServeBackend:
    """The split ingress's backend: the model deployments, by handle."""

    def __init__(self, handles: dict) -> None:
        self.handles = handles
        self.tasks = tuple(handles)

    async def answer(self, task: str, request, context=None):
        from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError

        try:
            return await self.handles[task].answer.remote(request, context)
        except RayActorError:
            # the model replica died with the request (killed, out of memory, its node lost): a prediction
            # only reads, so it is sent once more, to another replica (the handle's router has dropped the
            # dead one), rather than lost; Serve starts a replacement meanwhile
            return await self.handles[task].answer.remote(request, context)

    async def models(self):
        import asyncio

        described = await asyncio.gather(*(h.describe.remote() for h in self.handles.values()))
        return dict(zip(self.tasks, described, strict=True))


@serve.deployment(max_constructor_retry_count=2)
@serve.ingress()
class Api:
    """Layout ``split``: the HTTP ingress over the model deployments (one per task, in ``tasks`` order)."""

    def __init__(self, serving: ServingSettings, data_dir: str, tasks: tuple[str, ...], *handles) -> None:
        self.serving = serving
        self.data_dir = Path(data_dir)
        self.backend = ServeBackend(dict(zip(tasks, handles, strict=True)))

    def __serve_build_asgi_app__(self):
        return _app(self.serving, self.backend, self.data_dir)


def _app(serving: ServingSettings, backend, data_dir: Path):
    from shopsight.serving.app import build_app, monitor_metrics_file
    from shopsight.serving.metrics import ServingMetrics

    return build_app(
        backend,
        serving.api_keys,
        metrics=ServingMetrics.cluster(),  # every ingress replica's counts, whichever answers /metrics
        max_user_ids=serving.max_user_ids,
        metrics_open=serving.metrics_open,
        monitor_metrics=monitor_metrics_file(data_dir),
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
    the feature reader, the models), or a setting that is not in ``user_config`` nor the number of replicas
    (``SCALE_KEYS``: a new count adds or stops replicas and leaves the others serving)."""
    digest = hashlib.sha256(__version__.encode())
    root = Path(str(resources.files("shopsight")))
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    values = settings.model_dump(mode="json")
    for key in (*USER_CONFIG_KEYS, *SCALE_KEYS):
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
    tasks = tuple(task.name for task in served_tasks())
    models = [
        _options(ModelDeployment, version, name=name, **model_options).bind(settings, name) for name in tasks
    ]
    return _options(
        Api,
        version,
        name="api",
        num_replicas=serving.ingress_replicas,
        ray_actor_options={"num_cpus": serving.ingress_num_cpus},
        max_ongoing_requests=4 * serving.max_ongoing_requests,
    ).bind(serving, str(settings.data_dir), tasks, *models)


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
    for name in (task.name for task in served_tasks()):
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


def shutdown(settings: Settings, wait: bool = True) -> bool:
    """Delete the application (and stop Serve when nothing else runs in it); returns whether one ran.

    ``wait=False`` only asks Serve to delete it: a replica's graceful shutdown alone may take Serve's
    20 s, too long for a Ctrl-C. The Ray of a process that started its own ends with the process anyway,
    and a shared cluster's Serve controller finishes the deletion on its own.
    """
    app_name = settings.serving.app_name
    apps = serve.status().applications
    if app_name not in apps:
        return False
    serve.delete(app_name, _blocking=wait)
    if wait and not (set(apps) - {app_name}):
        serve.shutdown()
    return True


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder for config files (a RayService's ``serveConfigV2``):
    ``import_path: shopsight.serving.deploy:app_builder`` with ``args: {profile: cluster}``; the rest of
    the settings come from the environment (``SHOPSIGHT_*``), as everywhere else."""
    from shopsight.platform import load_settings

    return build_application(load_settings(profile=args.get("profile")).settings)
