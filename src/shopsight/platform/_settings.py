"""Settings and profiles.

Where a value comes from, highest precedence first::

    CLI (--set key=value, --data-dir)  >  environment (SHOPSIGHT_*)  >  --config YAML file
        >  profile file (src/shopsight/platform/profiles/<profile>.yaml)  >  field default

The profile itself is chosen by ``--profile``, else ``SHOPSIGHT_PROFILE``, else the ``profile:`` key of
the config file, else ``local``. Nested keys are dotted on the CLI (``spark.master``) and joined by a
double underscore in the environment (``SHOPSIGHT_SPARK__MASTER``). Unknown keys are errors wherever
they appear, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shopsight.platform._errors import ConfigError

ENV_PREFIX = "SHOPSIGHT_"
PROFILES = ("local", "cluster")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSettings(_Section):
    """Event data: the shop's calendar and what readers accept."""

    timezone: str = Field(
        "Asia/Shanghai",
        description="Shop-local timezone: it defines calendar days (partitions, snapshots, labels).",
    )
    window_start: date = Field(
        date(2017, 11, 25),
        description="First shop-local day an event may fall on; earlier ones are quarantined.",
    )
    window_end: date = Field(
        date(2017, 12, 3),
        description="Last shop-local day (inclusive) an event may fall on; later ones are quarantined.",
    )
    batch_rows: int = Field(1_000_000, gt=0, description="Rows a reader or writer holds in memory at once.")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r}") from exc
        return value


class FeatureSettings(_Section):
    """Feature jobs: windows, sessions, sequences, segments."""

    windows: tuple[int, ...] = Field(
        (1, 3, 7), description="Look-back windows in days for windowed features."
    )
    session_gap_minutes: int = Field(30, gt=0, description="Inactivity that starts a new session.")
    sequence_length: int = Field(50, gt=0, le=500, description="Events kept in the user sequence feature.")
    segments: int = Field(6, ge=2, le=50, description="k of the KMeans user segmentation.")

    @field_validator("windows")
    @classmethod
    def _sorted_positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(w < 1 for w in value):
            raise ValueError("windows must be positive day counts")
        return tuple(sorted(set(value)))


class SparkSettings(_Section):
    """Where Spark feature jobs run."""

    master: str = Field("local[*]", description="Spark master URL: local[*] or spark://host:7077.")
    driver_memory: str = Field("2g", description="spark.driver.memory.")
    shuffle_partitions: int = Field(
        8, gt=0, description="spark.sql.shuffle.partitions; small data wants few."
    )
    bind_address: str = Field("127.0.0.1", description="Address the driver binds to.")
    conf: dict[str, str] = Field(default_factory=dict, description="Extra Spark configuration, key -> value.")


class RaySettings(_Section):
    """Where Ray Train, Tune and Serve run."""

    address: str | None = Field(
        None,
        description="Ray cluster address (http://head:8265 for jobs); null starts or reuses a local head.",
    )
    num_cpus: int | None = Field(None, gt=0, description="CPUs of the local head; null lets Ray detect them.")
    auth_token_path: str | None = Field(
        None,
        description="File with the cluster's token (Ray token authentication); null: the local head's, "
        "under data_dir/ray.",
    )
    head_port: int = Field(6379, gt=0, lt=65536, description="GCS port of the local head (`cluster up`).")
    dashboard_port: int = Field(
        8265, gt=0, lt=65536, description="Dashboard and Jobs API port of the local head (`cluster up`)."
    )
    head_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources the local head offers, name -> amount."
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources each Ray Train worker needs, name -> amount: pins training to the "
        "nodes that offer them (e.g. {trainer: 1} with one trainer per node spreads workers over nodes).",
    )
    storage_path: str | None = Field(
        None,
        description="Checkpoints and Ray Train/Tune results, on storage every node sees (a shared mount "
        "or s3://...); null: data_dir/ray_results.",
    )


class FeastSettings(_Section):
    """The feature store."""

    project: str = Field("shopsight", description="Feast project name.")
    offline_store: Literal["file", "spark"] = Field("file", description="Offline store backend.")
    online_store: Literal["sqlite", "redis"] = Field("sqlite", description="Online store backend.")
    redis_url: str | None = Field(
        None,
        description="Redis of the redis online store, redis://[USER@]HOST:PORT/DB (USER: an ACL user; "
        "none: Redis's default user); rediss:// for TLS. No password in it: see redis_password_file.",
    )
    # The Redis password itself is no setting: a setting can come from --set (a command line `ps` shows)
    # and travels in the settings file a Ray job ships. Like libpq's PGPASSWORD, it comes from the
    # environment (FEAST_REDIS_PASSWORD, on Kubernetes from a Secret), or from a file this setting names.
    redis_password_file: str | None = Field(
        None,
        description="File holding the Redis password (requirepass, or the ACL user's), e.g. a mounted "
        "Secret; null: the environment variable FEAST_REDIS_PASSWORD, if set.",
    )
    registry: str | None = Field(
        None,
        description="Registry: null = a file under data_dir; or a SQL URL (postgresql+psycopg://USER@HOST/"
        "feast; the password as PGPASSWORD, which libpq reads, rather than in the URL).",
    )


class MlflowSettings(_Section):
    """Tracking server and model registry."""

    tracking_uri: str | None = Field(
        None, description="Tracking server URL; null = a local server under data_dir."
    )
    backend_store_uri: str | None = Field(
        None,
        description="Local server's SQL backend (sqlite:///..., postgresql+psycopg://USER@HOST:5432/mlflow; "
        "a password is better given as PGPASSWORD); null = SQLite under data_dir.",
    )
    artifact_root: str | None = Field(
        None,
        description="Local server's artifact root (a folder or s3://...), served to clients through the "
        "server; null = a folder under data_dir.",
    )
    host: str = Field(
        "127.0.0.1",
        description="Address the local tracking server (`shopsight mlflow up`) binds to; 0.0.0.0 for all.",
    )
    port: int = Field(
        5000,
        gt=0,
        lt=65536,
        description="Port of the local tracking server; when another process holds it on loopback, the "
        "server starts on a free port instead (and says so).",
    )
    # Who may move `champion`: MLflow's own authentication (its basic-auth app). Passwords are never
    # settings (they would be on command lines and in `config show`): only where they are kept.
    auth: bool = Field(
        False,
        description="MLflow authentication: every client logs in as an MLflow user (MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD, or mlflow.credentials_file), and moving a model's aliases needs "
        "EDIT or MANAGE on it; the local server runs MLflow's basic-auth app. cluster profile: true.",
    )
    credentials_file: str | None = Field(
        None,
        description="This client's MLflow login, a file in MLflow's credentials format ([mlflow] with "
        "mlflow_tracking_username and mlflow_tracking_password); it wins over the MLFLOW_TRACKING_* "
        "variables. null: those variables, else ~/.mlflow/credentials (MLflow's own lookup).",
    )
    admin_username: str = Field(
        "admin",
        description="MLflow admin user: created by the local server's first start with auth, used by "
        "`shopsight mlflow user`.",
    )
    admin_password_file: str | None = Field(
        None,
        description="File holding the admin's password (12 or more characters); null: the environment "
        "variable MLFLOW_AUTH_ADMIN_PASSWORD, which MLflow itself reads.",
    )
    outage_wait_s: float = Field(
        300.0,
        ge=0,
        description="How long a finished training run waits for a tracking server (mlflow.tracking_uri) that "
        "stopped answering, before it fails with its checkpoints kept; a local server is started again "
        "instead.",
    )
    auth_default_permission: Literal["READ", "NO_PERMISSIONS"] = Field(
        "READ",
        description="The local server's permission for a logged-in user on a model or experiment without "
        "a grant (`shopsight mlflow user grant`); never more than READ, or anyone could move champion.",
    )


class PromotionSettings(_Section):
    """The promotion gate (`shopsight models promote`)."""

    tolerance: float = Field(
        0.005,
        ge=0,
        description="Largest drop of the primary metric (next item: NDCG@10 sampled; purchase: ROC-AUC), "
        "absolute, a candidate may show against the champion and still be promoted.",
    )
    calibration_tolerance: float = Field(
        0.02,
        ge=0,
        description="Largest rise of the calibration error (ECE), absolute, a candidate of a task with "
        "probabilities (purchase, churn) may show against the champion and still be promoted.",
    )
    bootstrap_samples: int = Field(
        1000, ge=50, description="Resamples of the paired bootstrap interval of the metric difference."
    )
    seed: int = Field(0, description="Seed of the evaluation (sampled negatives) and of the bootstrap.")
    lock_ttl_s: float = Field(
        3600.0, gt=0, description="Seconds after which the lock of a promotion that died expires."
    )
    lock_settle_s: float = Field(
        1.0, ge=0, description="Wait between taking the promotion lock and checking it is still ours."
    )


class ObjectStoreSettings(_Section):
    """S3-compatible storage shared by the cluster (checkpoints, artifacts, offline store)."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint, e.g. http://minio:9000; null = local disk."
    )
    bucket: str | None = Field(None, description="Bucket for Shopsight's files.")


class AutoscalingSettings(_Section):
    """Ray Serve autoscaling of each model deployment (used instead of serving.replicas when set)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas of a model deployment.")
    max_replicas: int = Field(2, gt=0, description="Most replicas of a model deployment.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Requests in flight per replica that the autoscaler aims at."
    )


class ServingSettings(_Section):
    """The Ray Serve application of the champion models (`shopsight serve deploy`)."""

    app_name: str = Field("shopsight", description="Ray Serve application name.")
    host: str = Field("127.0.0.1", description="Address Ray Serve's HTTP proxy binds to.")
    port: int = Field(8000, gt=0, lt=65536, description="Port of Ray Serve's HTTP proxy.")
    layout: Literal["combined", "split"] = Field(
        "combined",
        description="combined: one deployment holds the HTTP API and both models (one hop less); "
        "split: an HTTP ingress plus a deployment per model, scaled apart (e.g. GPU model replicas).",
    )
    replicas: int = Field(1, gt=0, description="Replicas of each model deployment (without autoscaling).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per model replica (also its torch threads).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (0: CPU inference).")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Autoscaling of the model deployments; null: a fixed serving.replicas."
    )
    ingress_replicas: int = Field(1, gt=0, description="Replicas of the HTTP ingress (auth, validation).")
    ingress_num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(64, gt=0, description="Requests a replica accepts at once.")
    max_batch_size: int = Field(16, gt=0, description="@serve.batch: most requests scored in one call.")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="@serve.batch: longest wait for a batch to fill, seconds (0: take what is queued; "
        "under load requests queue while the previous batch is scored, so batches still form).",
    )
    poll_interval_s: float = Field(
        5.0, gt=0, description="How often replicas resolve the champion/challenger aliases in MLflow."
    )
    canary_share: float = Field(
        0.0, ge=0, le=1, description="Share of requests answered by the challenger (0: none)."
    )
    shadow: bool = Field(
        False, description="The challenger also scores every champion request; logged, never returned."
    )
    routing_seed: int = Field(0, description="Seed of the canary draw (reproducible traffic split).")
    max_user_ids: int = Field(100, gt=0, le=10_000, description="Most user ids in one propensity request.")
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Team -> sha256 hex of its API key (`shopsight serve key TEAM` makes one); "
        "empty: every /v1 request is refused.",
    )
    metrics_open: bool = Field(
        False,
        description="Serve /metrics without an API key. It names the teams and their traffic, so by "
        "default a scraper sends a key too (Prometheus: `authorization: {credentials: KEY}`).",
    )

    @field_validator("api_keys")
    @classmethod
    def _hashed_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for team, digest in value.items():
            if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
                raise ValueError(
                    f"serving.api_keys.{team} must be the sha256 hex digest of the key, never the key itself"
                )
        return value


class Settings(_Section):
    """Everything a Shopsight command needs to know about where it runs."""

    profile: Literal["local", "cluster"] = Field(
        "local", description="Which profile the values started from."
    )
    data_dir: Path = Field(Path(".shopsight"), description="Root of every file the platform writes locally.")
    data: DataSettings = Field(default_factory=DataSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    spark: SparkSettings = Field(default_factory=SparkSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    feast: FeastSettings = Field(default_factory=FeastSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    promotion: PromotionSettings = Field(default_factory=PromotionSettings)
    object_store: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)


@dataclass(frozen=True)
class ResolvedSettings:
    """Settings plus, for every leaf key, where its value came from (``default``, ``profile:local``, ...)."""

    settings: Settings
    sources: dict[str, str]

    def items(self) -> Iterator[tuple[str, Any, str]]:
        """Yield ``(dotted key, value, source)`` for every leaf setting, in declaration order."""
        for key, value in _flatten(self.settings.model_dump()).items():
            yield key, value, self.sources.get(key, "default")

    def shown_items(self) -> Iterator[tuple[str, str, str]]:
        """:meth:`items` as they may be shown: values as text, secrets masked (:func:`shown_value`)."""
        for key, value, source in self.items():
            yield key, shown_value(key, value), source


# --- secrets: never shown -----------------------------------------------------------------------------
# Passwords and tokens are kept out of the settings where they can be (FEAST_REDIS_PASSWORD, PGPASSWORD,
# token files), but a setting may still hold one. By name: any *password, *token, *secret, *credential or
# *key a section adds, and the entries of spark.conf such as spark.hadoop.fs.s3a.secret.key, so a new one
# is masked without being listed here; a name that only says where a secret is kept (ray.auth_token_path,
# feast.redis_password_file) is no secret. By value: a URL with USER:PASSWORD@ (a registry or backend
# store URL), masked by mask_secrets.
_SECRET_NAME = re.compile(r"passw(or)?d|secret|token|credential|(^|[._-])key$", re.IGNORECASE)
_POINTER_SUFFIXES = ("_path", "_file")
_MASK = "***"


def is_secret_setting(name: str) -> bool:
    """Whether a setting (``mlflow.tracking_token``) or a spark.conf key holds a secret, by its name."""
    name = name.lower()
    return bool(_SECRET_NAME.search(name)) and not name.endswith(_POINTER_SUFFIXES)


def mask_secrets(text: str) -> str:
    """``text`` with the password of a URL in it (``scheme://user:PASSWORD@host``) replaced by ``***``.

    It is :func:`shopsight.platform.mlflow_server.mask` (SQLAlchemy's reading of the URL), plus two cases
    it leaves visible: the rest of a password with an unescaped ``@`` (SQLAlchemy stops at the first ``@``,
    libpq and urllib at the last), and a password given as a query parameter (``?password=``, which
    libpq accepts).
    """
    from shopsight.platform.mlflow_server import mask  # here: that module imports this one

    shown = mask(text)
    shown = re.sub(r"(\w://[^/\s:@]*:)[^\s/]*@", rf"\1{_MASK}@", shown)
    return re.sub(r"([?&](?:password|passwd)=)[^&#\s]*", rf"\1{_MASK}", shown, flags=re.IGNORECASE)


def shown_value(key: str, value: Any) -> str:
    """A setting's value as ``config show`` prints it: ``null``, ``***`` for a secret, URL passwords masked.

    API-key digests (``serving.api_keys.TEAM``) show their first 8 hex digits: a digest is no credential
    (the server wants the key itself), and a prefix is enough to tell which key a team has (`shopsight
    serve key` prints the full one), so the rest stays off screens and logs.
    """
    if value is None:
        return "null"
    if is_secret_setting(key):
        return _MASK
    if key.startswith("serving.api_keys."):
        return f"{str(value)[:8]}…"
    if isinstance(value, Mapping):  # spark.conf: entries by their own names
        value = {k: _MASK if is_secret_setting(str(k)) else v for k, v in value.items()}
    return mask_secrets(str(value))


def load_settings(
    profile: str | None = None,
    config_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ResolvedSettings:
    """Resolve the settings from all sources (see the module docstring for precedence).

    Args:
        profile: ``local`` or ``cluster``; ``None`` picks it from the environment, the file or the default.
        config_file: a YAML file with the same nesting as :class:`Settings`.
        overrides: dotted keys from the CLI, e.g. ``{"spark.master": "local[2]"}``.
        environ: the environment to read ``SHOPSIGHT_*`` from (default: ``os.environ``).

    Returns:
        The validated settings and the source of each value.

    Raises:
        ConfigError: unknown profile or key, unreadable file, or a value of the wrong type.
    """
    environ = os.environ if environ is None else environ
    file_values = _read_yaml(Path(config_file), "config file") if config_file else {}
    env_values = _env_values(environ)
    cli_values = _unflatten(dict(overrides or {}), "--set")

    chosen = profile or environ.get(ENV_PREFIX + "PROFILE") or file_values.get("profile") or "local"
    if chosen not in PROFILES:
        raise ConfigError(f"unknown profile {chosen!r}: choose one of {', '.join(PROFILES)}")
    profile_values = _read_yaml(
        resources.files("shopsight.platform") / "profiles" / f"{chosen}.yaml", "profile"
    )

    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers = [
        (f"profile:{chosen}", profile_values),
        (f"file:{config_file}", file_values),
        ("env", env_values),
        ("cli", cli_values),
    ]
    for source, values in layers:
        _deep_merge(merged, values, sources, source, prefix="")
    merged["profile"] = chosen
    sources["profile"] = _profile_source(profile, environ, file_values)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, sources)) from None
    return ResolvedSettings(settings=settings, sources=sources)


def _profile_source(profile: str | None, environ: Mapping[str, str], file_values: Mapping[str, Any]) -> str:
    if profile:
        return "cli"
    if environ.get(ENV_PREFIX + "PROFILE"):
        return "env:SHOPSIGHT_PROFILE"
    if file_values.get("profile"):
        return "file"
    return "default"


def _read_yaml(path: Any, what: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of settings, not {type(values).__name__}")
    return values


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "PROFILE":
            continue
        key = ".".join(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        value: Any = raw
        # Mappings (spark.conf) and lists (features.windows) come as JSON. A secret is a string whatever its
        # first character, and never parsed: a parse error would quote it.
        if raw.startswith(("{", "[")) and not is_secret_setting(key):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise ConfigError(f"environment variable {name} is not valid JSON") from None
        flat[key] = value
    return _unflatten(flat, "environment variable")


def _unflatten(flat: Mapping[str, Any], what: str) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", key):
            raise ConfigError(
                f"bad setting name {key!r} in {what}: use dotted lowercase keys like spark.master"
            )
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _deep_merge(
    target: dict, values: Mapping[str, Any], sources: dict[str, str], source: str, prefix: str
) -> None:
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if (
            isinstance(value, Mapping)
            and isinstance(target.get(key), dict | type(None))
            and not _is_mapping_field(dotted)
        ):
            _deep_merge(target.setdefault(key, {}), value, sources, source, dotted + ".")
        else:
            target[key] = value
            sources[dotted] = (
                f"env:{ENV_PREFIX}{dotted.upper().replace('.', '__')}" if source == "env" else source
            )


def _is_mapping_field(dotted: str) -> bool:
    """Keys whose value is itself a mapping (spark.conf): merged whole, not key by key."""
    return dotted == "spark.conf"


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and not _is_mapping_field(dotted):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _describe_validation_error(exc: ValidationError, sources: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors():
        dotted = ".".join(str(part) for part in error["loc"])
        where = sources.get(dotted)
        origin = f" (from {where})" if where else ""
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown setting {dotted!r}{origin}")
        else:
            problems.append(f"{dotted}: {error['msg']}{origin}")
    return "invalid settings: " + "; ".join(problems)
