"""The serving path's online lookup: a feature service's values for a batch of users, with little overhead.

``FeatureStore.get_online_features`` resolves feature references against the registry, builds a
response proto and converts it on every call. A model server asks for the same service every time, so
:class:`OnlineFeatureReader` resolves the service once and then calls the online store's own read
(SQLite or Redis, whichever the profile uses) for each view, converting values straight to Python; the
packed layout (:mod:`shopsight.features.packed`) gives plain values without protobufs.
Its values equal the SDK's (tested). For a steady tail latency in a long-lived server, call
``gc.freeze()`` once after start-up: it keeps the garbage collector from walking the loaded registry
and model on every full collection.
"""

from __future__ import annotations

from collections.abc import Sequence

from shopsight.features.packed import PackedStore, python_value
from shopsight.features.store import feature_service, feature_store
from shopsight.platform import Settings


class OnlineFeatureReader:
    """Read one feature service online, for many users at once.

    Args:
        settings: the profile (its online store is used).
        service: a feature service name, e.g. ``next_item_v1``.
        features: only these features of the service (default: all).

    Raises:
        ShopsightError: unknown feature service.
    """

    def __init__(self, settings: Settings, service: str, features: Sequence[str] | None = None) -> None:
        store = feature_store(settings)
        fs = feature_service(store, service)
        self._config = store.config
        # The provider is Feast's own online store access; the SDK calls it the same way.
        self._provider = store._get_provider()
        self._online = self._provider.online_store
        self._views = []
        for projection in fs.feature_view_projections:
            names = [f.name for f in projection.features if features is None or f.name in features]
            if names:
                self._views.append((store.get_feature_view(projection.name), names))
        self.feature_names = [name for _, names in self._views for name in names]

    def read(self, user_ids: Sequence[int]) -> dict[str, list]:
        """``{"user_id": [...], feature: [value per user]}``; None where a user has no value."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=int(u))]) for u in user_ids]
        out: dict[str, list] = {"user_id": [int(u) for u in user_ids]}
        if isinstance(self._online, PackedStore):  # plain values, no protobuf in between
            packed = self._online.serialized_keys(self._config, keys)
            views = self._online.read_views(self._config, [view for view, _ in self._views], packed)
            for (_, names), rows in zip(self._views, views, strict=True):
                for name in names:
                    out[name] = [None if row is None else row[1].get(name) for row in rows]
            return out
        for view, names in self._views:
            # a copy: the Redis store appends its timestamp field to the list it is given
            rows = self._provider.online_read(
                config=self._config, table=view, entity_keys=keys, requested_features=list(names)
            )
            for name in names:
                out[name] = [None if values is None else python_value(values.get(name)) for _, values in rows]
        return out
