"""Who may read which feature service, and who may change it.

Identity is the platform's API keys (:mod:`shopsight.platform.api_keys`): a team is a name in
``serving.api_keys``, the same one the prediction API knows. Feast's own identities need an identity
provider (OIDC tokens checked against its published keys) or a Kubernetes API server (service-account
tokens), and the platform's teams already hold keys.

Grants are Feast ``Permission`` objects in the registry, one per feature service (``read-<service>``:
the service's reads, online and offline, for a group of teams). So they live where the definitions do (a
file locally, PostgreSQL on clusters), survive restarts, reach every replica of the feature server within
its registry refresh, and show in Feast's own tools (``feast permissions list``). The platform's feature
server enforces them (:mod:`shopsight.features.gateway`); Feast's server-side enforcement needs its
identities, above.

Owners: every feature view, service, source and entity carries its owner team in ``tags["owner"]``. Only
that team may grant or revoke reads of a service, and change or delete what it owns: a team applies its own
definitions with ``shopsight features apply --definitions FILE.py`` and deletes them with ``features
delete``, with its key in ``SHOPSIGHT_API_KEY``; the platform's own ``features apply`` changes only the
platform's objects. (Feast's ``feast apply`` writes the registry without asking: on a cluster only the
platform's pods hold the registry's credentials.)
"""

from __future__ import annotations

import contextlib
import runpy
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from shopsight.platform import Settings, ShopsightError
from shopsight.platform.api_keys import acting_team

PERMISSION_PREFIX = "read-"
MANAGED_BY = "shopsight"


@dataclass(frozen=True)
class ServiceGrant:
    """A feature service, its owner and the teams that may read it (besides the owner)."""

    service: str
    owner: str
    teams: tuple[str, ...]


def grants(store) -> list[ServiceGrant]:
    """Every feature service of the registry with the teams granted its reads."""
    readers = _readers(store.registry.list_permissions(store.project, allow_cache=False))
    return [
        ServiceGrant(s.name, s.tags.get("owner", ""), tuple(sorted(readers.get(s.name, ()))))
        for s in sorted(_services(store), key=lambda s: s.name)
    ]


def _services(store) -> list:
    """The registry's feature services as stored now (not as the store's cache last saw them)."""
    return store.registry.list_feature_services(store.project, allow_cache=False)


def grant(settings: Settings, team: str, service: str) -> ServiceGrant:
    """Let ``team`` read ``service``; only the service's owner (``SHOPSIGHT_API_KEY``) may."""
    return _change(settings, team, service, add=True)


def revoke(settings: Settings, team: str, service: str) -> ServiceGrant:
    """Take back ``team``'s reads of ``service``; only the service's owner may."""
    return _change(settings, team, service, add=False)


def _change(settings: Settings, team: str, service: str, *, add: bool) -> ServiceGrant:
    from feast.errors import FeastObjectNotFoundException

    from shopsight.features.store import feature_service, feature_store

    store = feature_store(settings)
    owner = feature_service(store, service).tags.get("owner", "")
    actor = acting_team(settings)
    if actor != owner:
        raise ShopsightError(
            f"only the owner of {service!r} ({owner or 'nobody'}) may change who reads it; "
            f"SHOPSIGHT_API_KEY is {actor}'s key"
        )
    known = settings.serving.api_keys
    if add and team not in known:
        raise ShopsightError(
            f"no team {team!r}: known teams are {', '.join(sorted(known)) or 'none'} "
            "(`shopsight serve key TEAM` makes one)"
        )
    try:
        teams = set(_readers([store.get_permission(PERMISSION_PREFIX + service)]).get(service, ()))
    except FeastObjectNotFoundException:
        teams = set()
    if add:
        teams.add(team)
    elif team not in teams:
        raise ShopsightError(f"{team} holds no grant on {service!r}: nothing to revoke")
    else:
        teams.discard(team)
    store.apply([_permission(service, owner, teams)])
    return ServiceGrant(service, owner, tuple(sorted(teams)))


def _permission(service: str, owner: str, teams: Iterable[str]):
    from feast import FeatureService
    from feast.permissions.action import AuthzedAction
    from feast.permissions.permission import Permission
    from feast.permissions.policy import GroupBasedPolicy

    return Permission(
        name=PERMISSION_PREFIX + service,
        types=[FeatureService],
        name_patterns=[service],  # a full match: service names hold no pattern characters
        actions=[AuthzedAction.READ_ONLINE, AuthzedAction.READ_OFFLINE],
        # an empty group list would read as "no policy": a group no team can be keeps it closed
        policy=GroupBasedPolicy(groups=sorted(teams) or ["-"]),
        tags={"owner": owner, "managed-by": MANAGED_BY},
    )


def _readers(permissions) -> dict[str, set[str]]:
    readers: dict[str, set[str]] = {}
    for permission in permissions:
        if permission.tags.get("managed-by") != MANAGED_BY:
            continue
        service = permission.name.removeprefix(PERMISSION_PREFIX)
        readers[service] = {g for g in permission.policy.get_groups() if g != "-"}
    return readers


class Readers:
    """Who may read what, as the feature server sees it: the registry's grants and owners, read again
    at most every ``ttl_s`` seconds (a grant or revocation takes effect within that)."""

    def __init__(self, store, ttl_s: float = 5.0) -> None:
        self.store, self.ttl_s = store, ttl_s
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._services: dict[str, tuple[str, set[str], set[str]]] = {}

    def _refresh(self) -> dict[str, tuple[str, set[str], set[str]]]:
        with self._lock:
            if time.monotonic() - self._read_at >= self.ttl_s:
                registry, project = self.store.registry, self.store.project
                readers = _readers(registry.list_permissions(project, allow_cache=False))
                self._services = {
                    s.name: (
                        s.tags.get("owner", ""),
                        readers.get(s.name, set()),
                        {
                            f"{p.name_to_use()}:{f.name}"
                            for p in s.feature_view_projections
                            for f in p.features
                        },
                    )
                    for s in _services(self.store)
                }
                self._read_at = time.monotonic()
            return self._services

    def services(self) -> list[str]:
        return sorted(self._refresh())

    def may_read(self, team: str, service: str) -> bool:
        owner, teams, _ = self._refresh()[service]
        return team == owner or team in teams

    def covering(self, team: str, refs: Iterable[str]) -> tuple[list[str], list[str]]:
        """For feature references (``view:feature``): those no service readable by ``team`` holds, and
        the services that would give them."""
        services = self._refresh()
        readable = set().union(
            *(fields for name, (_, _, fields) in services.items() if self.may_read(team, name))
        )
        missing = [ref for ref in refs if ref not in readable]
        givers = sorted(name for name, (_, _, fields) in services.items() if fields & set(missing))
        return missing, givers


# --- who may change definitions -----------------------------------------------------------------------

_KINDS = ("Entity", "FeatureView", "OnDemandFeatureView", "FeatureService", "DataSource")


def _kind(obj) -> str | None:
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView
    from feast.data_source import DataSource

    for cls in (Entity, FeatureView, OnDemandFeatureView, FeatureService, DataSource):
        if isinstance(obj, cls):
            return cls.__name__
    return None


def _registered(store) -> dict[tuple[str, str], object]:
    """Every object of the registry as stored now, by (kind, name)."""
    registry, project = store.registry, store.project
    found: dict[tuple[str, str], object] = {}
    for kind, listing in (
        ("Entity", registry.list_entities),
        ("FeatureView", registry.list_feature_views),
        ("OnDemandFeatureView", registry.list_on_demand_feature_views),
        ("FeatureService", registry.list_feature_services),
        ("DataSource", registry.list_data_sources),
    ):
        found.update({(kind, obj.name): obj for obj in listing(project, allow_cache=False)})
    return found


def owner_of(obj) -> str:
    return (getattr(obj, "tags", None) or {}).get("owner", "")


def check_owners(store, objects: list, may_change: Callable[[str], bool], actor: str) -> list:
    """``objects`` less the registry's identical copies of others' objects (a team declares the platform's
    ``user`` entity to use it); ShopsightError if any other would change an object whose owner
    ``may_change`` refuses. ``actor`` names who asks, in the message."""
    registered = _registered(store)
    kept = []
    for obj in objects:
        kind = _kind(obj)
        current = registered.get((kind, obj.name)) if kind else None
        if current is None or may_change(owner_of(current)):
            kept.append(obj)
            continue
        if kind == "Entity" and current.join_key == obj.join_key:
            continue  # a reference to the entity (to use it in a view), not a change of it
        raise ShopsightError(
            f"{kind} {obj.name!r} belongs to {owner_of(current) or 'nobody'}: only its owner may change it "
            f"({actor} asked)"
        )
    return kept


def load_definitions(path: Path) -> list:
    """The Feast objects a team's definitions file defines at module level."""
    if not path.is_file() or path.suffix != ".py":
        raise ShopsightError(f"{path}: no such Python file of feature definitions")
    try:
        namespace = runpy.run_path(str(path))
    except Exception as exc:  # noqa: BLE001 - their code: one line naming it
        raise ShopsightError(f"{path} failed to load: {type(exc).__name__}: {exc}") from None
    objects = [value for name, value in namespace.items() if not name.startswith("_") and _kind(value)]
    if not objects:
        raise ShopsightError(f"{path} defines no Feast object (Entity, FeatureView, FeatureService, source)")
    return objects


def apply_definitions(settings: Settings, path: Path) -> list[str]:
    """Apply a team's definitions file as that team (``SHOPSIGHT_API_KEY``): what it defines is owned by
    the team (an ``owner`` tag naming another team is refused), and nothing owned by another team may be
    changed. Returns the names applied."""
    from shopsight.features.store import feature_store

    team = acting_team(settings)
    objects = load_definitions(path)
    for obj in objects:
        owner = owner_of(obj)
        if owner and owner != team:
            raise ShopsightError(
                f"{path}: {_kind(obj)} {obj.name!r} says its owner is {owner}, but SHOPSIGHT_API_KEY is "
                f"{team}'s key"
            )
        if _kind(obj) != "Entity" or not owner:
            obj.tags["owner"] = team
    store = feature_store(settings)
    kept = check_owners(store, objects, lambda owner: owner in ("", team), team)
    store.apply(kept)
    return [obj.name for obj in kept]


def delete(settings: Settings, name: str) -> str:
    """Delete a feature view or service that the acting team owns; returns its kind. Refused while a
    service of any team uses the view."""
    from shopsight.features.store import feature_store

    team = acting_team(settings)
    store = feature_store(settings)
    registered = _registered(store)
    found = [(kind, obj) for (kind, obj_name), obj in registered.items() if obj_name == name]
    found = [(kind, obj) for kind, obj in found if kind in ("FeatureView", "FeatureService")]
    if not found:
        raise ShopsightError(f"no feature view or service named {name!r}")
    kind, obj = found[0]
    if owner_of(obj) != team:
        raise ShopsightError(
            f"{kind} {name!r} belongs to {owner_of(obj) or 'nobody'}: only its owner may delete it"
        )
    if kind == "FeatureView":
        users = sorted(
            service.name
            for (k, _), service in registered.items()
            if k == "FeatureService" and any(p.name == name for p in service.feature_view_projections)
        )
        if users:
            raise ShopsightError(f"feature view {name!r} is used by {', '.join(users)}: delete those first")
        store.delete_feature_view(name)
    else:
        from feast.errors import FeastObjectNotFoundException

        store.delete_feature_service(name)
        with contextlib.suppress(FeastObjectNotFoundException):  # it had no grants
            store.registry.delete_permission(PERMISSION_PREFIX + name, store.project)
    return kind
