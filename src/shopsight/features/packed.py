"""Packed online stores: one value per entity and feature view, not one per feature.

Feast's SQLite and Redis online stores keep one row (SQLite) or hash field (Redis) per feature value, each
a serialised protobuf. A 50-feature view read for 100 users is then 5,000 protobuf decodes in Python,
most of a lookup's time. These stores keep, per entity and view, one MessagePack value: the event
timestamp and the view's values as plain data. A read decodes 100 values in C.

They are Feast online-store plugins (``online_store: {type: shopsight.features.packed.PackedSqliteOnlineStore,
path: ...}``, or ``...PackedRedisOnlineStore`` with Redis's ``connection_string``), so Feast's APIs,
materialisation and pushes work on them unchanged: ``online_read`` gives Feast the protobuf values it
expects. The platform's serving path (:class:`shopsight.features.online.OnlineFeatureReader`) asks for
plain values instead (:meth:`PackedStore.read_values`) and skips protobufs altogether.

A write that carries only some of a view's features (a push of a few columns) keeps the others: the
stored value is read and merged first. The layout is the platform's own: a store written by one layout is
not read by the other (``features materialize`` after switching ``feast.online_layout``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgpack
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.online_store import OnlineStore, SupportedAsyncMethods
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig
from feast.infra.online_stores.sqlite import SqliteOnlineStore, SqliteOnlineStoreConfig
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def python_value(value: ValueProto | None) -> Any:
    """A Feast ValueProto as a Python value: scalars as is, lists as lists, unset as None."""
    if value is None:
        return None
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    field = getattr(value, kind)
    return list(field.val) if kind.endswith("_list_val") else field


def _proto_makers(table) -> dict[str, Callable[[Any], ValueProto]]:
    """Per feature of a view, the function that turns its plain value back into a ValueProto (the proto's
    field is named after the feature's value type: INT64 -> int64_val, STRING_LIST -> string_list_val)."""

    def maker(field: str, is_list: bool) -> Callable[[Any], ValueProto]:
        def make(value: Any) -> ValueProto:
            proto = ValueProto()
            if value is None:
                return proto
            if is_list:
                getattr(proto, field).val.extend(value)
            else:
                setattr(proto, field, value)
            return proto

        return make

    makers = {}
    for feature in table.features:
        kind = feature.dtype.to_value_type().name.lower()
        makers[feature.name] = maker(f"{kind}_val", kind.endswith("_list"))
    return makers


def _pack(event_ts: datetime, values: dict[str, Any]) -> bytes:
    micros = round((_utc(event_ts) - _EPOCH).total_seconds() * 1_000_000)
    return msgpack.packb([micros, values], use_bin_type=True)


def _unpack(blob: bytes) -> tuple[datetime, dict[str, Any]]:
    micros, values = msgpack.unpackb(blob, raw=False)
    return datetime.fromtimestamp(micros / 1_000_000, UTC), values


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class PackedStore:
    """What both packed stores share: packing rows, answering Feast with protobufs and the platform with
    plain values. A subclass stores and fetches the packed bytes (``_put``, ``_get``)."""

    @property
    def async_supported(self) -> SupportedAsyncMethods:  # Feast's async paths would bypass the packing
        return SupportedAsyncMethods(read=False, write=False)

    # Feast's Redis store reads a service's views with its own hash-field reads, not online_read: the base
    # store's way goes through online_read, and so through the packing
    _read_features_per_fv = OnlineStore._read_features_per_fv

    def _keys(self, config, entity_keys) -> list[bytes]:
        version = config.entity_key_serialization_version
        return [serialize_entity_key(key, entity_key_serialization_version=version) for key in entity_keys]

    def online_write_batch(self, config, table, data, progress) -> None:
        keys = self._keys(config, [row[0] for row in data])
        names = {f.name for f in table.features}
        partial = [i for i, row in enumerate(data) if not names <= set(row[1])]
        # a row of only some features (a push of a few columns) keeps the view's other values
        partial_keys = [keys[i] for i in partial]
        stored = dict(zip(partial_keys, self._get(config, table, partial_keys), strict=True))
        rows = []
        for key, (_, values, event_ts, _created) in zip(keys, data, strict=True):
            plain = {name: python_value(value) for name, value in values.items()}
            if stored.get(key) is not None:
                plain = {**_unpack(stored[key])[1], **plain}
            rows.append((key, _pack(event_ts, plain)))
        self._put(config, table, rows)
        if progress:
            progress(len(data))

    def online_read(self, config, table, entity_keys, requested_features=None):
        makers = _proto_makers(table)
        names = [n for n in (requested_features or makers) if n in makers]
        answer = []
        for blob in self._get(config, table, self._keys(config, entity_keys)):
            if blob is None:
                answer.append((None, None))
                continue
            event_ts, values = _unpack(blob)
            answer.append((event_ts, {n: makers[n](values[n]) for n in names if n in values}))
        return answer

    def serialized_keys(self, config, entity_keys) -> list[bytes]:
        """Entity keys as the store keys them: serialise once, then :meth:`read_values` every view."""
        return self._keys(config, entity_keys)

    def read_values(self, config, table, keys: list[bytes]) -> list[tuple[int, dict[str, Any]] | None]:
        """Per serialised entity key, (event time in microseconds since the epoch, {feature: plain
        value}), or None where the store has no row: the serving path's read, with no protobuf."""
        return [
            None if blob is None else msgpack.unpackb(blob, raw=False)
            for blob in self._get(config, table, keys)
        ]

    def read_views(self, config, tables, keys: list[bytes]) -> list[list[tuple[int, dict[str, Any]] | None]]:
        """:meth:`read_values` of several views at once: one list of rows per view (Redis: one round
        trip for all of them)."""
        return [self.read_values(config, table, keys) for table in tables]

    def _put(self, config, table, rows: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def _get(self, config, table, keys: list[bytes]) -> list[bytes | None]:
        raise NotImplementedError


# --- SQLite -------------------------------------------------------------------------------------------


class PackedSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    """Feast's SQLite online store settings (``path``), for the packed layout."""

    type: str = "shopsight.features.packed.PackedSqliteOnlineStore"  # type: ignore[assignment]


class PackedSqliteOnlineStore(PackedStore, SqliteOnlineStore):
    """One SQLite row per entity and view: ``(entity_key, packed)``, keyed by the entity (no rowid)."""

    _local = threading.local()

    def _conn_of(self, config) -> sqlite3.Connection:
        # one connection per thread: the feature server answers from a thread pool
        path = self._get_db_path(config)
        conns = self._local.__dict__.setdefault("conns", {})
        if path not in conns:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")  # readers go on while a materialisation writes
            conns[path] = conn
        return conns[path]

    @staticmethod
    def _table(config, table) -> str:
        return '"' + f"{config.project}_{table.name}_packed".replace('"', '""') + '"'

    def _put(self, config, table, rows) -> None:
        conn = self._conn_of(config)
        with conn:
            conn.execute("BEGIN")
            conn.executemany(f"INSERT OR REPLACE INTO {self._table(config, table)} VALUES (?, ?)", rows)

    def _get(self, config, table, keys) -> list[bytes | None]:
        if not keys:
            return []
        found: dict[bytes, bytes] = {}
        conn = self._conn_of(config)
        name = self._table(config, table)
        for start in range(0, len(keys), 900):  # SQLite's limit on bound parameters
            chunk = keys[start : start + 900]
            marks = ",".join("?" * len(chunk))
            found.update(conn.execute(f"SELECT k, v FROM {name} WHERE k IN ({marks})", chunk).fetchall())
        return [found.get(key) for key in keys]

    def update(self, config, tables_to_delete, tables_to_keep, entities_to_delete, entities_to_keep, partial):
        conn = self._conn_of(config)
        for table in tables_to_keep:
            name = self._table(config, table)
            conn.execute(f"CREATE TABLE IF NOT EXISTS {name} (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")
        for table in tables_to_delete:
            conn.execute(f"DROP TABLE IF EXISTS {self._table(config, table)}")

    def plan(self, config, desired_registry_proto):
        return []  # no infra objects of Feast's own layout

    def teardown(self, config, tables, entities) -> None:
        conn = self._conn_of(config)
        for table in tables:
            conn.execute(f"DROP TABLE IF EXISTS {self._table(config, table)}")


# --- Redis --------------------------------------------------------------------------------------------


class PackedRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """Feast's Redis online store settings (``connection_string``, ``key_ttl_seconds``), packed."""

    type: str = "shopsight.features.packed.PackedRedisOnlineStore"  # type: ignore[assignment]


class PackedRedisOnlineStore(PackedStore, RedisOnlineStore):
    """One hash per entity, as Feast's Redis store keys it (entity key + project), with one field per
    view holding its packed values."""

    def _redis_keys(self, config, keys: list[bytes]) -> list[bytes]:
        project = config.project.encode()
        return [key + project for key in keys]

    def _put(self, config, table, rows) -> None:
        client = self._get_client(config.online_store)
        ttl = config.online_store.key_ttl_seconds
        field = table.name.encode()
        with client.pipeline(transaction=False) as pipe:
            for key, (_, blob) in zip(self._redis_keys(config, [r[0] for r in rows]), rows, strict=True):
                pipe.hset(key, field, blob)
                if ttl:
                    pipe.expire(key, ttl)
            pipe.execute()

    def _get(self, config, table, keys) -> list[bytes | None]:
        if not keys:
            return []
        client = self._get_client(config.online_store)
        field = table.name.encode()
        with client.pipeline(transaction=False) as pipe:
            for key in self._redis_keys(config, keys):
                pipe.hget(key, field)
            return pipe.execute()

    def read_views(self, config, tables, keys):
        if not keys:
            return [[] for _ in tables]
        client = self._get_client(config.online_store)
        fields = [table.name.encode() for table in tables]
        with client.pipeline(transaction=False) as pipe:
            for key in self._redis_keys(config, keys):
                pipe.hmget(key, fields)
            per_key = pipe.execute()
        return [
            [None if blobs[i] is None else msgpack.unpackb(blobs[i], raw=False) for blobs in per_key]
            for i in range(len(tables))
        ]

    def delete_table(self, config, table) -> None:
        client = self._get_client(config.online_store)
        field = table.name.encode()
        keys = list(client.scan_iter(b"*" + config.project.encode()))
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hdel(key, field)
            pipe.execute()


__all__ = ["PackedRedisOnlineStore", "PackedSqliteOnlineStore", "PackedStore", "python_value"]
