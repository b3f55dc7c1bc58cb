"""Settings and profiles.

Where a value comes from, lowest precedence first (each source overrides the ones before it)::

    field default
    < profile: the built-in profiles/<name>.yaml and/or the user's own profile of that name
    < the ecosystem's variables: MLFLOW_TRACKING_URI, RAY_ADDRESS (a Jobs API URL), MASTER (Spark's)
    < user config file: $XDG_CONFIG_HOME/shopsight/config.yaml (default ~/.config/shopsight/config.yaml)
    < config file: --config, else SHOPSIGHT_CONFIG
    < environment: SHOPSIGHT_*
    < CLI: --set key=value, --data-dir

The profile itself is chosen by ``--profile``, else ``SHOPSIGHT_PROFILE``, else the ``profile:`` key of the
config file, else that of the user config file, else ``local``. Besides the built-in ``local`` and
``cluster``, users define profiles under a ``profiles:`` mapping of the user config file or as files
``profiles/<name>.yaml`` beside it; one named like a built-in profile is layered over it.

Nested keys are dotted on the CLI (``spark.master``) and joined by a double underscore in the environment
(``SHOPSIGHT_SPARK__MASTER``). An entry of a mapping setting is named after it, dots and all:
``spark.conf.spark.sql.shuffle.partitions`` is the entry ``spark.sql.shuffle.partitions`` of ``spark.conf``;
a layer's entries add to or replace those of the layers below. Values from the CLI and the environment are
YAML (``[1, 3]``, ``{a: 1}``, ``null``, ``'quoted text'``), secrets excepted (:func:`parse_setting_value`).
Unknown keys are errors wherever they appear, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import Path, PurePath
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shopsight.platform._errors import ConfigError

ENV_PREFIX = "SHOPSIGHT_"
PROFILE_VARIABLE = ENV_PREFIX + "PROFILE"
CONFIG_VARIABLE = ENV_PREFIX + "CONFIG"
# a team's API key, for commands that act for a team (shopsight.platform.api_keys): no setting
API_KEY_VARIABLE = ENV_PREFIX + "API_KEY"
PROFILES = ("local", "cluster")  # built in; users define more (user_profiles)


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

    @field_validator("conf", mode="before")
    @classmethod
    def _values_as_text(cls, value: Any) -> Any:
        # Spark reads every configuration value as text; YAML and --set read `4` and `true` as a number and
        # a boolean, which mean the text "4" and "true" to Spark.
        if not isinstance(value, Mapping):
            return value
        return {key: _spark_text(item) for key, item in value.items()}


def _spark_text(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, int | float) else value


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
    online_layout: Literal["packed", "feast"] = Field(
        "packed",
        description="How the online store keeps rows: packed = one value per entity and view (the "
        "platform's Feast plugin, shopsight.features.packed); feast = Feast's own, one per feature.",
    )
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
    max_entities: int = Field(
        1000, gt=0, le=100_000, description="Most entity rows in one lookup of the feature server."
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


class MonitoringSettings(_Section):
    """`shopsight monitor`: the online metrics' cut-off, and the thresholds that make alerts."""

    k: int = Field(10, gt=0, description="The k of the online HR@k and NDCG@k (a served top k is judged).")
    max_psi: float = Field(
        0.25, gt=0, description="A feature whose PSI (served vs training set) is over this is an alert."
    )
    max_skew: float = Field(
        0.01,
        ge=0,
        le=1,
        description="A feature whose served value differs from the offline store's for a larger share of "
        "answers is an alert.",
    )
    skew_sample: int = Field(
        200, ge=0, description="Logged answers per task whose features are recomputed offline (0: no check)."
    )
    min_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Online metric -> the least a served version may reach (e.g. roc_auc: 0.6); below "
        "it is an alert.",
    )
    max_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Online metric -> the most a served version may reach (e.g. ece: 0.05); above it is "
        "an alert.",
    )
    experiment: str = Field("monitoring", description="The MLflow experiment of the monitoring runs.")


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
    dashboard_url: str | None = Field(
        None,
        description="Dashboard of the Ray cluster that serves, http://HEAD:8265: `serve status` reads "
        "Serve's REST API there (token from ray.auth_token_path); null: ray.address when it is a dashboard "
        "URL, else the local head.",
    )
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
    as_of: datetime | None = Field(
        None,
        description="The time answers describe, for a replay of past or simulated days (UTC, ISO 8601); "
        "default: the moment of the request.",
    )
    prediction_log: bool = Field(
        True,
        description="Log every served answer with the features it used (for `shopsight monitor`); "
        "turned off or on without restarting replicas.",
    )
    prediction_log_path: str | None = Field(
        None,
        description="Where the prediction log's parquet files go: a folder or s3://bucket/prefix "
        "(default: <data_dir>/predictions).",
    )
    prediction_log_roll_s: float = Field(
        60.0, gt=0, description="How often replicas turn their spooled records into parquet files."
    )
    metrics_open: bool = Field(
        False,
        description="Serve /metrics without an API key. It names the teams and their traffic, so by "
        "default a scraper sends a key too (Prometheus: `authorization: {credentials: KEY}`).",
    )

    @field_validator("as_of")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

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

    profile: str = Field(
        "local",
        description="Which profile the values started from: local, cluster, or one of the user's own.",
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
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)


@dataclass(frozen=True)
class ResolvedSettings:
    """Settings plus, for every leaf key, where its value came from (``default``, ``profile:local``, ...)."""

    settings: Settings
    sources: dict[str, str]

    def items(self) -> Iterator[tuple[str, Any, str]]:
        """Yield ``(dotted key, value, source)`` for every leaf setting, in declaration order: each entry
        of a mapping setting (``spark.conf.spark.sql.shuffle.partitions``), an empty mapping as itself."""
        for path, value in _leaves(self.settings.model_dump()):
            key = ".".join(path)
            yield key, value, self.sources.get(key, "default")

    def shown_items(self) -> Iterator[tuple[str, str, str]]:
        """:meth:`items` as they may be shown: values as YAML, secrets masked (:func:`shown_value`)."""
        for key, value, source in self.items():
            yield key, shown_value(key, value), source

    def file_values(self) -> tuple[dict[str, Any], list[str]]:
        """The settings as a settings file holds them, which ``--config`` reads back to these settings, and
        the keys of the secrets left out of it.

        A secret (by name, or a URL with a password) is left out rather than written masked: a file that
        said ``***`` would set the password to ``***`` (files that do are refused). Left out, it comes from
        wherever it came from before, the environment or a profile. API-key digests are written whole: a
        digest is no credential, and its shown prefix would not load.
        """
        kept: dict[tuple[str, ...], Any] = {}
        left_out: list[str] = []
        for path, value in _leaves(self.settings.model_dump(mode="json")):
            key = ".".join(path)
            secret = value is not None and is_secret_setting(key)
            if secret or (isinstance(value, str) and mask_secrets(value) != value):
                left_out.append(key)
            else:
                kept[path] = value
        return _nest(kept), left_out


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
    """A setting's value as ``config show`` prints it: YAML (``null``, ``[1, 3, 7]``, ``{}``), ``***`` for a
    secret, URL passwords masked.

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
    text = yaml.safe_dump(_masked(value), default_flow_style=True, allow_unicode=True, width=1_000_000)
    return text.removesuffix("\n...\n").strip()  # a lone scalar ends with YAML's document end marker


def _masked(value: Any) -> Any:
    """``value`` with URL passwords and secret-named mapping entries masked, as types YAML writes."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, Mapping):
        return {k: _MASK if is_secret_setting(str(k)) else _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


# what a file says where `config show` masked a secret: the whole value, or a URL's password
_MASKED_VALUE = re.compile(
    rf"^{re.escape(_MASK)}$|://[^/\s@]*:{re.escape(_MASK)}@|[?&](password|passwd)={re.escape(_MASK)}(&|#|$)",
    re.IGNORECASE,
)


# --- where values come from ---------------------------------------------------------------------------

_Path = tuple[str, ...]
_Assignment = tuple[_Path, Any, str]  # key, value, source


def _model_paths(model: type[BaseModel], prefix: _Path = ()) -> tuple[set[_Path], set[_Path]]:
    """The keys of ``model`` that are sections (models, merged key by key) and mappings (``spark.conf``:
    dicts whose entries are named by their own keys, dots and all)."""
    sections: set[_Path] = set()
    mappings: set[_Path] = set()
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        for kind in (field.annotation, *get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                sections.add(path)
                inner_sections, inner_mappings = _model_paths(kind, path)
                sections |= inner_sections
                mappings |= inner_mappings
            elif kind is dict or get_origin(kind) is dict:
                mappings.add(path)
    return sections, mappings


_SECTIONS, _MAPPINGS = _model_paths(Settings)

# Variables the ecosystem's own tools read, and the setting each one means, when its value means it. They
# rank above the profile, a deployment's defaults, since the variable says where this shell's tools point;
# and below anything written for Shopsight (its files, SHOPSIGHT_*, --set). mlflow.tracking_uri and
# ray.address name servers: an MLflow URI that is a file or a database is no server, and a RAY_ADDRESS
# that is a GCS address (HOST:6379, auto, ray://) is ray.init's, which Ray follows itself
# (ray_cluster.connect) and sets in every job it runs; `ray job submit` reads the same variable as the
# Jobs API URL, which is ray.address. MASTER is what spark-submit and PySpark read for the master URL.
_SERVER_URL = re.compile(r"^https?://", re.IGNORECASE)
ECOSYSTEM_VARIABLES: dict[str, tuple[str, Callable[[str], bool]]] = {
    "MLFLOW_TRACKING_URI": ("mlflow.tracking_uri", lambda value: bool(_SERVER_URL.match(value))),
    "RAY_ADDRESS": ("ray.address", lambda value: bool(_SERVER_URL.match(value))),
    "MASTER": ("spark.master", bool),
}


def user_config_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """``$XDG_CONFIG_HOME/shopsight``, else ``$HOME/.config/shopsight`` (the XDG base directory rule: a
    relative XDG_CONFIG_HOME is ignored); None without either."""
    environ = os.environ if environ is None else environ
    xdg = environ.get("XDG_CONFIG_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "shopsight"
    if environ.get("HOME"):
        return Path(environ["HOME"]) / ".config" / "shopsight"
    return None


def load_settings(
    profile: str | None = None,
    config_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ResolvedSettings:
    """Resolve the settings from all sources (see the module docstring for precedence).

    Args:
        profile: ``local``, ``cluster`` or a user's profile; ``None`` picks it from the environment, the
            config files or the default.
        config_file: a YAML file with the same nesting as :class:`Settings`; ``None``: ``SHOPSIGHT_CONFIG``.
        overrides: dotted keys from the CLI with their values, e.g. ``{"spark.master": "local[2]"}``
            (:func:`parse_setting_value` reads a CLI's text).
        environ: the environment to read ``SHOPSIGHT_*``, the ecosystem's variables and the user config
            directory from (default: ``os.environ``).

    Returns:
        The validated settings and the source of each value.

    Raises:
        ConfigError: unknown profile or key, unreadable file, a masked secret in a file, or a value of the
            wrong type.
    """
    environ = os.environ if environ is None else environ
    user_dir = user_config_dir(environ)
    user_file = user_dir / "config.yaml" if user_dir else None
    user_values = _read_yaml(user_file, "user config file") if user_file and user_file.is_file() else {}
    user_profiles = _profile_definitions(user_values.pop("profiles", None), user_file)
    config_file = config_file or environ.get(CONFIG_VARIABLE) or None
    file_values = _read_yaml(Path(config_file), "config file") if config_file else {}

    chosen, profile_source = _choose_profile(
        profile, environ, [(config_file, file_values), (user_file, user_values)]
    )
    merged: dict[_Path, tuple[Any, str]] = {}
    layers = [
        *_profile_layers(chosen, user_dir, user_file, user_profiles),
        _ecosystem_assignments(environ),
        _file_assignments(user_values, f"file:{user_file}"),
        _file_assignments(file_values, f"file:{config_file}"),
        _env_assignments(environ),
        _cli_assignments(overrides or {}),
    ]
    for layer in layers:
        for path, value, source in layer:
            _assign(merged, path, value, source)
    _assign(merged, ("profile",), chosen, profile_source)
    sources = {".".join(path): source for path, (_, source) in merged.items()}
    try:
        settings = Settings.model_validate(_nest({path: value for path, (value, _) in merged.items()}))
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, sources)) from None
    return ResolvedSettings(settings=settings, sources=sources)


def parse_setting_value(key: str, text: str, where: str) -> Any:
    """A value given as text on the CLI or in the environment, read as YAML: ``[1, 2]`` and ``{a: 1}`` are
    a list and a mapping, ``null``, ``~`` and nothing are null, a quoted string is its text.

    Other scalars stay text, for the setting's type to read (pydantic): ``0123`` is the string "0123" or
    the number 123, never YAML 1.1's octal 83, and ``12:30`` never 750. A secret (by its name) is never
    parsed: it is text whatever it starts with, and a parse error would quote it.

    Raises:
        ConfigError: text that starts as a list or mapping and is no valid YAML.
    """
    if is_secret_setting(key):
        return text
    flow = text.lstrip().startswith(("{", "["))
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        if flow:
            raise ConfigError(f"{where} is not valid JSON or YAML") from None
        return text
    if value is None or isinstance(value, str) or (flow and isinstance(value, list | dict)):
        return value
    return text


def _choose_profile(
    profile: str | None, environ: Mapping[str, str], files: list[tuple[Any, Mapping[str, Any]]]
) -> tuple[str, str]:
    if profile:
        return profile, "cli"
    if environ.get(PROFILE_VARIABLE):
        return environ[PROFILE_VARIABLE], f"env:{PROFILE_VARIABLE}"
    for path, values in files:
        if values.get("profile"):
            return str(values["profile"]), f"file:{path}"
    return "local", "default"


def _profile_definitions(profiles: Any, user_file: Path | None) -> dict[str, dict[str, Any]]:
    if profiles is None:
        return {}
    if not isinstance(profiles, Mapping) or not all(
        isinstance(values, Mapping | None) for values in profiles.values()
    ):
        raise ConfigError(f"profiles in {user_file} must map each profile's name to its settings")
    return {str(name): dict(values or {}) for name, values in profiles.items()}


def _profile_layers(
    chosen: str, user_dir: Path | None, user_file: Path | None, user_profiles: Mapping[str, Any]
) -> list[list[_Assignment]]:
    """The chosen profile's values: the built-in one, then the user's own of that name (from the user
    config file's ``profiles:`` or from ``profiles/<name>.yaml``, not both)."""
    source = f"profile:{chosen}"
    layers = []
    if chosen in PROFILES:
        builtin = resources.files("shopsight.platform") / "profiles" / f"{chosen}.yaml"
        layers.append(_file_assignments(_read_yaml(builtin, "profile"), source))
    profile_dir = user_dir / "profiles" if user_dir else None
    profile_file = (
        profile_dir / f"{chosen}.yaml" if profile_dir and re.fullmatch(r"[\w.-]+", chosen) else None
    )
    in_file = profile_file is not None and profile_file.is_file()
    if in_file and chosen in user_profiles:
        raise ConfigError(f"profile {chosen!r} is defined twice: in {user_file} and as {profile_file}")
    if chosen in user_profiles:
        layers.append(
            _file_assignments(user_profiles[chosen], source, where=f"profile {chosen} of {user_file}")
        )
    elif in_file:
        layers.append(_file_assignments(_read_yaml(profile_file, "profile"), source, where=str(profile_file)))
    if not layers:
        known = [*PROFILES, *sorted(set(user_profiles) - set(PROFILES))]
        if profile_dir is not None and profile_dir.is_dir():
            known += sorted({p.stem for p in profile_dir.glob("*.yaml")} - set(known))
        where = f" (yours: under profiles: in {user_file}, or as {profile_dir}/NAME.yaml)" if user_dir else ""
        raise ConfigError(f"unknown profile {chosen!r}: choose one of {', '.join(known)}{where}")
    return layers


def _ecosystem_assignments(environ: Mapping[str, str]) -> list[_Assignment]:
    return [
        (tuple(key.split(".")), environ[name], f"env:{name}")
        for name, (key, means_it) in ECOSYSTEM_VARIABLES.items()
        if environ.get(name) and means_it(environ[name])
    ]


def _file_assignments(values: Mapping[str, Any], source: str, where: str | None = None) -> list[_Assignment]:
    """The leaves of a YAML file's mapping (:func:`_leaves_of`).

    Raises:
        ConfigError: a value masked by `config show` (``***``), which would become the secret itself.
    """
    assignments = [leaf for name, value in values.items() for leaf in _leaves_of((str(name),), value, source)]
    for path, value, _ in assignments:
        if isinstance(value, str) and _MASKED_VALUE.search(value):
            raise ConfigError(
                f"{where or source.removeprefix('file:')}: {'.'.join(path)} is a secret masked by "
                "`shopsight config show` (***): write the real value there, or delete the line to keep the "
                "one from the environment or the profile"
            )
    return assignments


def _leaves_of(path: _Path, value: Any, source: str) -> list[_Assignment]:
    """A value given for ``path``, down to its leaves: a section key by key, a mapping setting entry by
    entry (so that each has its own source, and a layer adds entries rather than replacing the mapping)."""
    if isinstance(value, Mapping) and path in _MAPPINGS:
        return [((*path, str(entry)), item, source) for entry, item in value.items()]
    if isinstance(value, Mapping) and path in _SECTIONS:
        return [leaf for name, item in value.items() for leaf in _leaves_of((*path, str(name)), item, source)]
    return [(path, value, source)]


def _env_assignments(environ: Mapping[str, str]) -> list[_Assignment]:
    assignments: list[_Assignment] = []
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name in (PROFILE_VARIABLE, CONFIG_VARIABLE, API_KEY_VARIABLE):
            continue
        where = f"environment variable {name}"
        path = _setting_path(name[len(ENV_PREFIX) :].lower(), "__", where)
        assignments += _leaves_of(path, parse_setting_value(".".join(path), text, where), f"env:{name}")
    return assignments


def _cli_assignments(overrides: Mapping[str, Any]) -> list[_Assignment]:
    return [
        leaf
        for key, value in overrides.items()
        for leaf in _leaves_of(_setting_path(key, ".", "--set"), value, "cli")
    ]


def _setting_path(key: str, separator: str, where: str) -> _Path:
    """``spark.conf.spark.sql.shuffle.partitions`` -> ``("spark", "conf", "spark.sql.shuffle.partitions")``:
    after a mapping setting's name, the rest is the entry's own name."""
    parts = key.split(separator)
    for end in range(1, len(parts)):
        if tuple(parts[:end]) in _MAPPINGS:
            parts = [*parts[:end], separator.join(parts[end:])]
            break
    names = parts[:-1] if tuple(parts[:-1]) in _MAPPINGS else parts
    if not all(re.fullmatch(r"[a-z_][a-z0-9_]*", name) for name in names) or not parts[-1]:
        raise ConfigError(f"bad setting name {key!r} in {where}: use dotted lowercase keys like spark.master")
    return tuple(parts)


def _assign(merged: dict[_Path, tuple[Any, str]], path: _Path, value: Any, source: str) -> None:
    """Set ``path``, replacing what a lower layer set there, below it (a section given as null) or above it
    (a section set whole, e.g. serving.autoscaling: null, now set key by key)."""
    for key in [key for key in merged if key[: len(path)] == path or path[: len(key)] == key]:
        del merged[key]
    merged[path] = (value, source)


def _nest(flat: Mapping[_Path, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return nested


def _leaves(values: Mapping[str, Any], prefix: _Path = ()) -> Iterator[tuple[_Path, Any]]:
    """The leaves of a dumped :class:`Settings`: every entry of a mapping setting, an empty one as itself."""
    for name, value in values.items():
        path = (*prefix, name)
        if path in _SECTIONS and isinstance(value, Mapping):
            yield from _leaves(value, path)
        elif path in _MAPPINGS and isinstance(value, Mapping) and value:
            for entry, item in value.items():
                yield (*path, entry), item
        else:
            yield path, value


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


def _describe_validation_error(exc: ValidationError, sources: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors():
        dotted = ".".join(str(part) for part in error["loc"])
        # a mapping setting's error names the mapping; its entries came from where they came from
        where = sources.get(dotted) or ", ".join(
            sorted({source for key, source in sources.items() if key.startswith(dotted + ".")})
        )
        origin = f" (from {where})" if where else ""
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown setting {dotted!r}{origin}")
        else:
            problems.append(f"{dotted}: {error['msg']}{origin}")
    return "invalid settings: " + "; ".join(problems)
