"""The Feast feature store of a profile: apply, materialise, catalog, training sets, lookups, pushes.

The store is configured in code from the settings: ``local``: registry file, file offline store, SQLite
online store, all under ``<data_dir>/feast``; ``cluster``: SQL registry (PostgreSQL), Spark offline store,
Redis online store. ``feature_store.yaml`` is written from the same settings (:func:`repo_yaml`), for
Feast's own CLI, UI and clients, never read back: there is nothing to keep in sync by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd

from shopsight.data.schema import USER_ID
from shopsight.features.jobs import CREATED_TS, SNAPSHOT_TS
from shopsight.platform import ConfigError, FeastSettings, Settings, ShopsightError
from shopsight.platform._settings import API_KEY_VARIABLE, mask_secrets

log = logging.getLogger("shopsight.features")

# Dask, under Feast's file offline store, warns on every call about a pandas downcast it does itself.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"dask\..*")

# Feast writes the time bounds of its Spark queries as UTC wall-clock text (``TIMESTAMP('2017-12-02
# 16:00:00')``), which Spark reads in the session's time zone: its queries must run in UTC.
_FEAST_SPARK_TIMEZONE = "UTC"


def feast_dir(settings: Settings) -> Path:
    return Path(settings.data_dir).absolute() / "feast"


REPO_FILE = "feature_store.yaml"
REDIS_PASSWORD_VARIABLE = "FEAST_REDIS_PASSWORD"


def repo_config(settings: Settings):
    """Feast's RepoConfig for the profile's stores."""
    from feast.repo_config import RepoConfig

    folder = feast_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    return RepoConfig(**_repo_fields(settings), repo_path=str(folder))


def repo_yaml(settings: Settings, server: str | None = None) -> str:
    """The profile's ``feature_store.yaml``: what Feast's own CLI, UI and clients read (``feast -c
    <data_dir>/feast feature-views list``), the same stores as :func:`repo_config`. No secret is in it:
    Feast expands ``${FEAST_REDIS_PASSWORD}`` from the reader's environment, and a SQL registry's password
    is libpq's ``PGPASSWORD``.

    With ``server`` (a feature server's URL, ``shopsight features serve``), the file of another team's
    client instead: the same registry, and Feast's ``remote`` online store reading through that server, so
    the client needs nothing but ``feast`` and no access to Redis."""
    import yaml

    fields = _repo_fields(settings, redis_password="${" + REDIS_PASSWORD_VARIABLE + "}")
    if server:
        fields["online_store"] = {"type": "remote", "path": server.rstrip("/")}
        del fields["offline_store"]  # a client reads online features; training sets are the platform's
        # Feast's clients send an OIDC token as "Authorization: Bearer": here the team's API key, from
        # the reader's environment (shopsight.features.gateway)
        fields["auth"] = {"type": "oidc", "token_env_var": API_KEY_VARIABLE}
        header = (
            f"# A Feast client of Shopsight's feature server at {server} (profile {settings.profile}), as\n"
            "# `shopsight features repo-yaml --server URL` prints it: pip install feast, then\n"
            "#   FeatureStore(repo_path=<this folder>).get_online_features(features=..., entity_rows=...)\n"
            f"# with your team's API key in {API_KEY_VARIABLE}.\n"
        )
    else:
        header = (
            f"# Feast's view of Shopsight's feature repository (profile {settings.profile}), written by\n"
            "# `shopsight features apply`. For Feast's CLI, UI and clients:\n"
            "#   feast -c <this folder> feature-views list | feature-services list | ui\n"
            f"# Secrets come from the environment: {REDIS_PASSWORD_VARIABLE} (Redis), PGPASSWORD "
            "(registry).\n"
        )
    return header + yaml.safe_dump(fields, sort_keys=False)


def write_repo_yaml(settings: Settings) -> Path:
    """Write :func:`repo_yaml` as ``<data_dir>/feast/feature_store.yaml`` (whole, or not at all)."""
    path = feast_dir(settings) / REPO_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(repo_yaml(settings))
    partial.replace(path)
    return path


class _QuietServeWhileMaterializing(logging.Filter):
    """Feast 0.67 warns, each time it reads its configuration, that ``serve_features_while_materializing``
    "typically has no effect" on a file registry. It has one: without it, a read during a materialisation
    of the local store fails with "is in state 'MATERIALIZING' and cannot serve features" (tested by the
    scheduled-materialisation test)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "serve_features_while_materializing" not in record.getMessage()


logging.getLogger("feast.repo_config").addFilter(_QuietServeWhileMaterializing())

# the packed online layout's Feast plugins (shopsight.features.packed), by backend
PACKED_STORES = {
    "sqlite": "shopsight.features.packed.PackedSqliteOnlineStore",
    "redis": "shopsight.features.packed.PackedRedisOnlineStore",
}


def _repo_fields(settings: Settings, redis_password: str | None = None) -> dict[str, Any]:
    """RepoConfig's fields for the settings; ``redis_password`` in place of the real one (a placeholder
    for a file that must not hold it)."""
    folder = feast_dir(settings)
    feast = settings.feast
    if feast.registry and "://" in feast.registry:
        registry: dict[str, Any] = {"registry_type": "sql", "path": feast.registry, "cache_ttl_seconds": 60}
    else:
        registry = {"path": feast.registry or str(folder / "registry.db")}
    # Feast marks a view MATERIALIZING in the registry while a materialisation runs, and by default every
    # reader of the registry then refuses to serve it: a scheduled run would take serving down each time.
    # The rows being replaced are still there, and serving them is what an online store is for.
    registry["serve_features_while_materializing"] = True
    if feast.online_store == "redis":
        connection = f"{redis_connection_string(feast, redis_password)},{REDIS_CLIENT_OPTIONS}"
        online: dict = {"type": "redis", "connection_string": connection}
    else:
        online = {"type": "sqlite", "path": str(folder / "online.db")}
    if feast.online_layout == "packed":
        online["type"] = PACKED_STORES[feast.online_store]
    offline: dict = {"type": "file"}
    if feast.offline_store == "spark":
        offline = {"type": "spark", "spark_conf": _spark_conf(settings)}
    return {
        "project": feast.project,
        "provider": "local",
        "registry": registry,
        "offline_store": offline,
        "online_store": online,
        "entity_key_serialization_version": 3,
    }


def _spark_conf(settings: Settings) -> dict[str, str]:
    """The Spark configuration of a session Feast starts itself (where none runs in its thread): the same
    master, loopback binding and extra settings as the feature jobs', in UTC (see _FEAST_SPARK_TIMEZONE)."""
    spark = settings.spark
    return {
        "spark.master": spark.master,
        "spark.app.name": "shopsight-feast",
        "spark.driver.memory": spark.driver_memory,
        "spark.driver.bindAddress": spark.bind_address,
        "spark.driver.host": spark.bind_address,
        "spark.sql.shuffle.partitions": str(spark.shuffle_partitions),
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        **spark.conf,
        "spark.sql.session.timeZone": _FEAST_SPARK_TIMEZONE,
    }


@contextmanager
def _offline_engine(settings: Settings) -> Iterator[None]:
    """Around Feast calls that read the offline store: with the Spark offline store, Feast's queries run on
    the profile's Spark session (built from the settings like the feature jobs', so with the venv's Python
    workers and the configured bind address) switched to UTC while they run, and switched back after (the
    feature jobs' sessions count days in the shop's time zone). A no-op for the file offline store."""
    if settings.feast.offline_store != "spark":
        yield
        return
    from shopsight.features._spark import build_spark

    session = build_spark(settings, app_name="shopsight-feast")  # the running session, if there is one
    previous = session.conf.get("spark.sql.session.timeZone")
    session.conf.set("spark.sql.session.timeZone", _FEAST_SPARK_TIMEZONE)
    try:
        yield
    finally:
        session.conf.set("spark.sql.session.timeZone", previous)


# Options of Feast's Redis client: redis-py keyword arguments, which Feast reads from the connection string
# (values as JSON). A model server reads the online store in every request and answers without features
# (a fallback) when it cannot, so a read must fail fast, and the next one try again: redis-py's defaults
# have no socket timeouts (a Redis that stops answering would hang the read, and the replica with it) and
# retry 3 times with a jittered backoff of up to 2, 4 and 8 s (a Redis that is down would stall each read
# for seconds). ``retry=null`` is redis-py's "no retries" (``Retry(NoBackoff(), 0)``). The 1 s bounds each
# connect and each socket read or write, not a whole command: ample for Redis, whose commands take
# microseconds, materialisation's pipelines included.
REDIS_CLIENT_OPTIONS = "socket_connect_timeout=1,socket_timeout=1,retry=null"

# The environment variable with the Redis password (on Kubernetes from the Secret shopsight-redis), used
# when neither feast.redis_password_file nor the URL gives one, as libpq uses PGPASSWORD. Not plain
# REDIS_PASSWORD: KubeRay reserves that name in Ray head pods for its own Redis (GCS fault tolerance).
REDIS_PASSWORD_ENV = "FEAST_REDIS_PASSWORD"


@dataclass(frozen=True)
class RedisTarget:
    """The online store's Redis and its login, from ``feast.redis_url`` and the password's source."""

    host: str
    port: int
    db: str
    username: str | None
    password: str | None = field(repr=False)  # kept out of reprs: they end up in logs and tracebacks
    password_from: str | None  # what an error names as the password's source
    ssl: bool

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def redis_target(feast: FeastSettings) -> RedisTarget:
    """Parse ``feast.redis_url`` (``redis[s]://[USER@]HOST:PORT/DB``) and find the password: the file
    ``feast.redis_password_file``, else ``$FEAST_REDIS_PASSWORD``. One inside the URL is still read, but not
    together with the file, so that it is never unclear which one Redis got.

    Raises:
        ConfigError: no or a bad URL, an unreadable password file, two passwords, or a login Feast's
            connection string cannot carry.
    """
    url = feast.redis_url
    if not url:
        raise ConfigError("feast.online_store is redis but feast.redis_url is not set")
    parsed = urlparse(url)
    db = parsed.path.strip("/") or "0"
    try:
        port = parsed.port or 6379
    except ValueError:
        port = None
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname or port is None or not db.isdigit():
        # masked: the URL may carry a password
        raise ConfigError(
            f"feast.redis_url {mask_secrets(url)!r} is not a Redis URL (redis://[USER@]HOST:PORT/DB)"
        )
    given = []  # (password, where it came from)
    if parsed.password:
        given.append((unquote(parsed.password), "the password in feast.redis_url"))
    if feast.redis_password_file:
        path = Path(feast.redis_password_file).expanduser()
        try:
            given.append((path.read_text().rstrip("\r\n"), f"{path}, feast.redis_password_file"))
        except OSError as exc:
            raise ConfigError(
                f"cannot read feast.redis_password_file {path}: {exc.strerror or exc}"
            ) from None
    if len(given) > 1:
        raise ConfigError(
            "the Redis password is given twice, in feast.redis_url and in feast.redis_password_file: "
            "keep only the file"
        )
    if not given and os.environ.get(REDIS_PASSWORD_ENV):
        given.append((os.environ[REDIS_PASSWORD_ENV], REDIS_PASSWORD_ENV))
    password, password_from = given[0] if given else (None, None)
    username = unquote(parsed.username) if parsed.username else None
    for what, value, source in (
        ("user name", username, "feast.redis_url"),
        ("password", password, password_from),
    ):
        if value is not None and not _survives_feast(value):
            raise ConfigError(
                f"the Redis {what} (from {source}) holds a comma or reads as a JSON value (a number, true, "
                "false, null, a quoted string), which Feast's Redis connection string cannot carry: "
                "choose another, e.g. `openssl rand -hex 32`"
            )
    return RedisTarget(
        host=parsed.hostname,
        port=port,
        db=db,
        username=username,
        password=password,
        password_from=password_from,
        ssl=parsed.scheme == "rediss",
    )


def _survives_feast(value: str) -> bool:
    """Whether a value reaches Redis unchanged through Feast's connection string, which Feast splits at
    commas and whose values it reads as JSON where they parse (``123`` would arrive as a number)."""
    if "," in value:
        return False
    try:
        json.loads(value)
    except ValueError:
        return True
    return False


def redis_connection_string(feast: FeastSettings, password: str | None = None) -> str:
    """Feast's ``host:port,db=N[,username=U][,password=P][,ssl=true]`` for the online store's Redis.

    It holds the password: it goes to Feast's config only, never into a message or a log line. A
    ``password`` given stands in for the real one, where there is one (a placeholder for a file).
    """
    target = redis_target(feast)
    parts = [target.address, f"db={target.db}"]
    if target.username:
        parts.append(f"username={target.username}")
    if target.password:
        parts.append(f"password={password or target.password}")
    if target.ssl:
        parts.append("ssl=true")
    return ",".join(parts)


def check_redis_login(feast: FeastSettings) -> None:
    """Log in to the online store's Redis once, so that a refused password fails with one line naming
    where the password came from (never the password), not deep inside a Feast read or write.

    An unreachable Redis passes: the commands that use it fail where they do, and those that do not (the
    catalog, training sets) keep working.

    Raises:
        ShopsightError: Redis refused the login, wants a password and got none, or has none and got one.
    """
    import redis

    target = redis_target(feast)
    client = _redis_client(target)
    where = f"Redis at {target.address}"
    try:
        client.ping()
    except redis.AuthenticationError as exc:  # a ConnectionError too: caught first
        reason = str(exc)
        if target.password is None:
            message = (
                f"{where} requires a password and none is set ({REDIS_PASSWORD_ENV} or "
                "feast.redis_password_file)"
            )
        elif "without any password configured" in reason:
            message = (
                f"{where} has no password, but one is set (from {target.password_from}): start it with "
                "requirepass or an ACL user"
            )
        else:
            user = f" of user {target.username!r}" if target.username else ""
            message = f"{where} refused the password{user} (from {target.password_from})"
        raise ShopsightError(message) from None
    except (redis.ConnectionError, redis.TimeoutError):
        return
    finally:
        client.close()


def _redis_client(target: RedisTarget):
    import redis

    return redis.Redis(
        host=target.host,
        port=target.port,
        db=int(target.db),
        username=target.username,
        password=target.password,
        ssl=target.ssl,
        socket_connect_timeout=5,
        socket_timeout=5,
    )


def _loaded_mark(settings: Settings) -> str:
    """The key, in the online store's Redis, that says a materialisation loaded it (and until when)."""
    return f"shopsight:{settings.feast.project}:materialized_until"


def online_store_lost(settings: Settings) -> bool:
    """Whether the online store no longer holds what was materialised into it: a Redis that restarted
    without its data (no persistence, or a new instance), or a removed SQLite file. Incremental runs load
    only what is new, so such a store stays empty until a full run: :func:`materialize` does one."""
    if settings.feast.online_store == "redis":
        client = _redis_client(redis_target(settings.feast))
        try:
            return not client.exists(_loaded_mark(settings))
        finally:
            client.close()
    return not (feast_dir(settings) / "online.db").exists()


def _mark_loaded(settings: Settings, end: datetime) -> None:
    if settings.feast.online_store == "redis":  # a SQLite store's file is its own mark
        client = _redis_client(redis_target(settings.feast))
        try:
            client.set(_loaded_mark(settings), end.isoformat())
        finally:
            client.close()


def feature_store(settings: Settings):
    """The profile's FeatureStore."""
    from feast import FeatureStore

    _read_sources_as_one_partition()
    _write_registry_files_whole()
    if settings.feast.offline_store == "spark":
        # Feast's Spark store and source say on every call that they are experimental; the filter goes in
        # after their import, whose own `simplefilter("once")` would otherwise come first.
        import feast.infra.offline_stores.contrib.spark_offline_store.spark  # noqa: F401

        warnings.filterwarnings(
            "ignore", category=RuntimeWarning, module=r"feast\.infra\.offline_stores\.contrib\.spark.*"
        )
    config = repo_config(settings)
    if settings.feast.online_store == "redis":
        check_redis_login(settings.feast)
    return FeatureStore(config=config)


def _read_sources_as_one_partition() -> None:
    """Work around Feast 0.67's file offline store on folder sources.

    With a multi-file source, a point-in-time join whose entity rows include an entity absent from the
    source raises ``NotImplementedError: Divisions calculation failed``; reading each source as one dask
    partition avoids it (our daily snapshots are small per day, and dask still streams the files).
    """
    import feast.infra.offline_stores.dask as feast_dask

    if getattr(feast_dask._read_datasource, "_shopsight_patched", False):
        return
    original = feast_dask._read_datasource

    def read_one_partition(data_source, repo_path):
        return original(data_source, repo_path).repartition(npartitions=1)

    read_one_partition._shopsight_patched = True  # type: ignore[attr-defined]
    feast_dask._read_datasource = read_one_partition


def _write_registry_files_whole() -> None:
    """Work around Feast 0.67's file registry, which rewrites its file in place: opening it for writing
    empties it first, so a process reading the registry meanwhile (a feature server, a scheduled
    materialisation's neighbour) sees no views at all ("unknown feature service ...; known: none").
    Every materialisation rewrites the file. Write a temporary file beside it and rename it over the old
    one, which readers see whole or not at all."""
    from feast.infra.registry.file import FileRegistryStore

    if getattr(FileRegistryStore._write_registry, "_shopsight_patched", False):
        return

    def write_whole(self, registry_proto) -> None:
        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(datetime.now(UTC))
        self._filepath.parent.mkdir(exist_ok=True)
        partial = self._filepath.with_name(f"{self._filepath.name}.{os.getpid()}.partial")
        with open(partial, mode="wb", buffering=0) as f:
            f.write(registry_proto.SerializeToString())
            os.fsync(f.fileno())
        os.replace(partial, self._filepath)

    write_whole._shopsight_patched = True  # type: ignore[attr-defined]
    FileRegistryStore._write_registry = write_whole


def apply(settings: Settings) -> list[str]:
    """Register the repository's objects, and write the repository's ``feature_store.yaml`` for Feast's
    own tools (:func:`write_repo_yaml`); returns the names of the feature views and services."""
    from shopsight.features.access import check_owners
    from shopsight.features.definitions import PLATFORM_OWNERS, repository

    store = feature_store(settings)  # first: it quiets the Spark source's warnings that repository() raises
    objects = repository(settings)
    # a team's object of the same name is the team's: the platform's definitions do not overwrite it
    objects = check_owners(store, objects, lambda owner: owner in ("", *PLATFORM_OWNERS), "the platform")
    store.apply(objects)
    write_repo_yaml(settings)
    return [o.name for o in objects if type(o).__name__ in ("FeatureView", "FeatureService")]


def materialize(
    settings: Settings,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    incremental=False,
    on_view: Callable[[int, int, str], None] | None = None,
    on_lost: Callable[[str], None] | None = None,
) -> list[str]:
    """Load offline rows into the online store, view after view; returns the views loaded.

    Without ``start``, the range is everything the offline store holds (the first materialisation)
    or, with ``incremental``, everything since the last one. An incremental run on an online store that
    lost its rows (:func:`online_store_lost`) loads everything, and says so to ``on_lost(message)``.
    ``on_view(done, total, name)`` hears each view as it starts, and once more when all are loaded.
    """
    store = feature_store(settings)
    end = end or datetime.now(UTC)
    views = [fv.name for fv in store.list_feature_views() if fv.online and _has_data(fv)]
    report = on_view or (lambda *_: None)
    loaded_before = any(store.get_feature_view(view).most_recent_end_time for view in views)
    if incremental and loaded_before and online_store_lost(settings):
        incremental = False
        if on_lost:
            on_lost(
                f"the {settings.feast.online_store} online store lost its rows (restarted without its "
                "data?): loading everything again"
            )
    with _offline_engine(settings):
        for done, view in enumerate(views):
            report(done, len(views), view)
            if incremental and store.get_feature_view(view).most_recent_end_time:
                store.materialize_incremental(end_date=end, feature_views=[view])
            else:
                # Feast's first incremental run starts at now - ttl, which misses older snapshots: go full.
                store.materialize(
                    start_date=start or datetime(1970, 1, 1, tzinfo=UTC), end_date=end, feature_views=[view]
                )
    _mark_loaded(settings, end)
    report(len(views), len(views), "")
    return views


def materialize_every(
    settings: Settings,
    every_s: float,
    say: Callable[[str], None],
    runs: int | None = None,
    stop: threading.Event | None = None,
) -> tuple[int, int]:
    """Incremental materialisation every ``every_s`` seconds (from one start to the next), until ``stop``
    is set (a run under way finishes first) or after ``runs`` runs; returns (runs, failed runs).

    Each run says one line. A failed run (Redis or the offline store unreachable) says why, and the next
    run tries again: an incremental run loads everything since the last one that succeeded, and a store
    that lost its rows gets all of them (:func:`materialize`).
    """
    stop = stop or threading.Event()
    done = failed = 0
    while not stop.is_set() and (runs is None or done < runs):
        started = time.monotonic()
        try:
            views = materialize(settings, incremental=True, on_lost=say)
            say(f"{_clock()} loaded {len(views)} views in {time.monotonic() - started:.1f} s")
        except Exception as exc:  # noqa: BLE001 - whatever failed, the schedule goes on
            failed += 1
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            say(f"{_clock()} failed: {reason}")
        done += 1
        if runs is None or done < runs:
            stop.wait(max(0.0, every_s - (time.monotonic() - started)))
    return done, failed


def _clock() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S UTC")


def _has_data(view) -> bool:
    """False for a view whose local table was never written (``user_embedding`` before ``features
    embed``): there is nothing to load, and Feast would fail on the missing path."""
    path = getattr(view.batch_source, "path", None)
    if not path or "://" in str(path):
        return True  # remote storage: let Feast read it
    return Path(path).exists() and any(Path(path).glob("*=*"))


@dataclass(frozen=True)
class FieldInfo:
    name: str
    dtype: str
    description: str
    owner: str


@dataclass(frozen=True)
class ViewInfo:
    name: str
    kind: str  # "feature view" or "feature service"
    entities: list[str]
    description: str
    owner: str
    fields: list[FieldInfo]
    online: bool
    fresh_until: datetime | None  # the end of the last materialisation


def catalog(settings: Settings) -> list[ViewInfo]:
    """Every feature view and service: fields, types, owners, descriptions, online freshness."""
    store = feature_store(settings)
    views = {}
    for fv in store.list_feature_views():
        views[fv.name] = ViewInfo(
            name=fv.name,
            kind="feature view",
            entities=[c.name for c in fv.entity_columns],
            description=fv.description,
            owner=fv.tags.get("owner", ""),
            fields=[
                FieldInfo(f.name, str(f.dtype), f.description, f.tags.get("owner", "")) for f in fv.features
            ],
            online=fv.online,
            fresh_until=fv.most_recent_end_time,
        )
    services = []
    for service in store.list_feature_services():
        fields = []
        for projection in service.feature_view_projections:
            fields += [
                FieldInfo(f"{projection.name}:{f.name}", str(f.dtype), f.description, f.tags.get("owner", ""))
                for f in projection.features
            ]
        parts = [views[p.name] for p in service.feature_view_projections if p.name in views]
        services.append(
            ViewInfo(
                name=service.name,
                kind="feature service",
                entities=sorted({e for v in parts for e in v.entities}),
                description=service.description,
                owner=service.tags.get("owner", ""),
                fields=fields,
                online=all(v.online for v in parts),
                fresh_until=min((v.fresh_until for v in parts if v.fresh_until), default=None),
            )
        )
    return [*views.values(), *services]


def describe(settings: Settings, name: str) -> ViewInfo:
    """One view or service of the catalog; ShopsightError naming the known ones if there is none."""
    entries = catalog(settings)
    for entry in entries:
        if entry.name == name:
            return entry
    known = ", ".join(sorted(e.name for e in entries)) or "none: run `shopsight features apply`"
    raise ShopsightError(f"no feature view or service named {name!r}; known: {known}")


def feature_service(store, name: str):
    from feast.errors import FeatureServiceNotFoundException

    try:
        return store.get_feature_service(name)
    except FeatureServiceNotFoundException:
        known = ", ".join(sorted(s.name for s in store.list_feature_services())) or "none"
        raise ShopsightError(f"unknown feature service {name!r}; known: {known}") from None


def online_features(settings: Settings, service: str, entity_rows: list[dict], store=None) -> dict[str, list]:
    """Online values of a feature service for entity rows, as ``{column: [values]}``."""
    store = store or feature_store(settings)
    return store.get_online_features(
        features=feature_service(store, service), entity_rows=entity_rows
    ).to_dict()


def historical_features(
    store,
    entity_df: pd.DataFrame,
    service: str,
    on_view: Callable[[int, int, str], None] | None = None,
) -> pd.DataFrame:
    """Point-in-time join of a feature service onto ``entity_df`` (``event_timestamp`` + join keys).

    Unlike Feast 0.67's file offline store, every entity row comes back, in the input order: Feast drops
    rows that have no feature row within the TTL and, asked for several views at once, loses all their
    features with them; so each view is joined separately and merged back on a row id.
    """
    fs = feature_service(store, service)
    rows = entity_df.reset_index(drop=True).copy()
    rows["__row"] = range(len(rows))
    result = rows
    report = on_view or (lambda *_: None)
    projections = fs.feature_view_projections
    for done, projection in enumerate(projections):
        report(done, len(projections), projection.name_to_use())
        refs = [f"{projection.name_to_use()}:{f.name}" for f in projection.features]
        frame = store.get_historical_features(entity_df=rows, features=refs).to_df()
        new = [c for c in frame.columns if c not in rows.columns]
        result = result.merge(frame[["__row", *new]], on="__row", how="left")
    report(len(projections), len(projections), "")
    return result.sort_values("__row").drop(columns="__row").reset_index(drop=True)


def features_as_of(settings: Settings, service: str, entity_df: pd.DataFrame) -> pd.DataFrame:
    """The service's features for ``entity_df``'s rows (``user_id``, ``event_timestamp``) as the offline
    store had them at each row's time: what a training set of those rows would hold."""
    store = feature_store(settings)
    with _offline_engine(settings):
        return historical_features(store, entity_df, service)


def training_set(
    settings: Settings,
    service: str,
    start: date,
    end: date,
    out: Path,
    *,
    label: str = "buy_next_1d",
    on_view: Callable[[int, int, str], None] | None = None,
) -> tuple[Path, int]:
    """A point-in-time correct training set: label rows (user, snapshot time) of ``start`` .. ``end``
    joined with the service's features as they were at each snapshot. Written as one parquet file.

    ``label`` is the column of the labels table that goes into the set (``buy_next_1d``, ``churn_3d``).
    Rows where it is unknown (null: ``churn_3d`` on the last days, whose 3 next days were not observed
    yet) are dropped, and their number logged as a warning: counting them as negatives would teach that
    users churn less than they do.

    ``on_view(done, total, name)`` hears each of the service's views as its join starts, and once more at
    the end. (One join per snapshot day would show finer progress, but Feast's file store reads every
    file for each join: four times slower on the demo's eight days.)
    """
    labels_path = Path(settings.data_dir).absolute() / "features" / "labels"
    if not labels_path.exists():
        raise ShopsightError(f"no labels under {labels_path}: run `shopsight features build` first")
    store = feature_store(settings)
    feature_service(store, service)  # fail early on an unknown name
    labels = pd.read_parquet(labels_path)
    known = sorted(set(labels.columns) - {USER_ID, "snapshot_day", SNAPSHOT_TS, CREATED_TS})
    if label not in known:
        raise ShopsightError(
            f"no label {label!r} under {labels_path}; known: {', '.join(known)} (a build older than the "
            "label? rebuild the features)"
        )
    day = pd.to_datetime(labels["snapshot_day"].astype(str)).dt.date
    labels = labels[(day >= start) & (day <= end)]
    unknown = labels[label].isna()
    if unknown.any():  # a warning: the CLI shows no info logs, and a smaller set than asked for needs saying
        log.warning(
            "%s: dropped %d of %d rows whose label is unknown (its days are past the last observed one)",
            label,
            unknown.sum(),
            len(labels),
        )
    labels = labels[~unknown]
    if labels.empty:
        raise ShopsightError(
            f"no snapshot days labelled with {label} between {start} and {end} under {labels_path}"
        )
    entity_df = labels[[USER_ID, SNAPSHOT_TS, label]].astype({label: bool})
    entity_df = entity_df.rename(columns={SNAPSHOT_TS: "event_timestamp"})
    with _offline_engine(settings):
        frame = historical_features(store, entity_df, service, on_view=on_view)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    frame.to_parquet(partial, index=False, coerce_timestamps="us", allow_truncated_timestamps=True)
    partial.replace(out)
    return out, len(frame)


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 6566, workers: int = 1) -> None:
    """Run the feature server (blocks until stopped): Feast's HTTP server, behind the platform's keys and
    grants (:mod:`shopsight.features.gateway`).

    Its gunicorn's control socket (``gunicornc -s PATH``) is this data directory's own: see
    :func:`control_socket`.
    """
    store = feature_store(settings)
    with (
        _feast_server_application(settings, control_socket(settings, port)),
        _metrics_of_all_workers(feast_dir(settings) / f"feature-server-{port}-metrics"),
    ):
        store.serve(
            host=host, port=port, type_="http", no_access_log=True, workers=workers, registry_ttl_sec=5
        )


def control_socket(settings: Settings, port: int) -> Path:
    """The control socket of this data directory's feature server on ``port``:
    ``<data_dir>/feast/feature-server-<port>.ctl``.

    gunicorn (>= 25.1) opens a control socket for ``gunicornc``, by default at
    ``$XDG_RUNTIME_DIR/gunicorn.ctl`` or ``~/.gunicorn/gunicorn.ctl``: one path for every gunicorn the
    user runs on the machine. A second feature server (another data directory's, or this one's on another
    port) unlinks the first one's socket and binds its own there: ``gunicornc`` then reaches the wrong
    server, and the first to stop removes the other's socket. A socket's path is limited to 107 bytes, so
    a data directory too deep for it (or not writable) gets one in the temp folder, named after its path
    and the port, as Ray's session folder is (:func:`shopsight.platform.ray_cluster.ray_temp_dir`).
    """
    path = feast_dir(settings) / f"feature-server-{port}.ctl"
    if len(os.fsencode(path)) <= 107:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return path
        except OSError:
            pass
    digest = hashlib.sha256(str(Path(settings.data_dir).absolute()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"shopsight-feast-{digest}-{port}.ctl"


@contextmanager
def _metrics_of_all_workers(folder: Path) -> Iterator[None]:
    """Within the block, every worker process of the server keeps its metrics in ``folder``
    (``prometheus_client``'s multiprocess mode), so that ``/metrics``, on whichever worker answers it,
    reports the reads of all of them; a registry per worker would report one worker's share, a different
    one from scrape to scrape. The folder is emptied first: counts start again with the server."""
    import shutil

    from prometheus_client import values

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    saved = os.environ.get("PROMETHEUS_MULTIPROC_DIR"), values.ValueClass
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    # the value class is chosen when prometheus_client is imported, which this process may have done
    # already; the workers (forked later) inherit this one
    values.ValueClass = values.MultiProcessValue()
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved[0]
        values.ValueClass = saved[1]
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _feast_server_application(settings: Settings, control: Path) -> Iterator[None]:
    """Have ``FeatureStore.serve``, within the block, run Feast's app behind the gateway, with its
    gunicorn's control socket at ``control``.

    ``FeatureStore.serve`` builds its gunicorn application from a fixed class and options, without
    either: the class is swapped for one that adds them, for the duration of the block.
    """
    from feast import feature_server

    from shopsight.features.gateway import Gateway

    application = getattr(feature_server, "FeastServeApplication", None)
    if application is None:
        raise ShopsightError("the feature server needs gunicorn (Linux or macOS)")

    class BehindGateway(application):  # type: ignore[misc, valid-type]
        def load_config(self) -> None:
            super().load_config()
            self.cfg.set("control_socket", str(control))

        def load(self):
            return Gateway(super().load(), self._store, settings)

    feature_server.FeastServeApplication = BehindGateway
    try:
        yield
    finally:
        feature_server.FeastServeApplication = application
