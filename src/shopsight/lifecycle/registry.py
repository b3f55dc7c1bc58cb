"""MLflow model-registry helpers: what a registered model holds, its promotion history, and a lease that
keeps two promotions of one model from interleaving. Stage-free: it knows tags, aliases and runs, never
how a model is evaluated (that is :mod:`shopsight.lifecycle.promotion`).

What the registry records, beside MLflow's own versions and aliases:

Registered-model tags
    ``eval.path``, ``eval.sha256``, ``eval.frozen_at``, ``eval.frozen_by``: the frozen evaluation set, on
    which every promotion evaluates candidate and champion (set by the first promotion).
    ``history.0001``, ``history.0002``, ...: one promotion or rollback each, as JSON (see
    :func:`append_history`). One tag per entry, because a registered-model tag value holds at most 5,000
    characters in MLflow's SQL stores; the zero-padded number keeps them in order.
    ``promotion.lock``: the lease of a promotion or rollback in progress (see :class:`RegistryLock`).

Model-version tags
    ``promoted_at``, ``promoted_by``, ``promoted_from``, ``promotion_action`` (promote | rollback),
    ``promotion_reason``, ``forced`` on the version that became champion; ``demoted_at``, ``demoted_by``,
    ``replaced_by`` on the one it replaced (``rolled_back_at``, ``rolled_back_by``, ``rollback_reason``
    when a rollback replaced it); ``gate.status``, ``gate.reason``, ``gate.checked_at`` on every candidate
    the gate examined.

Who: every ``by`` and ``*_by`` above, and the lock's owner, is :func:`acting_user`: with ``mlflow.auth``
the MLflow user the server authenticated (the one its permission checks were made for), else the login
name, which only the client vouches for.

The ``promotions`` experiment
    One run per decision (a promotion, a refusal, a rollback; :func:`log_decision_run`), so that the
    tracking UI lists them beside the training runs and compares them: both evaluations as metrics, the
    bootstrap interval, the decision, who (``mlflow.user``) and why, and the history entry as
    ``decision.json``. The tags above stay the source of truth: the run is written after them, and a run
    that cannot be written is a warning, never a changed decision.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from shopsight.platform._errors import ShopsightError
from shopsight.platform._settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTIONS_EXPERIMENT = "promotions"
LOCK_TAG = "promotion.lock"
HISTORY_PREFIX = "history."
EVAL_PATH, EVAL_SHA256 = "eval.path", "eval.sha256"
# the version tags train.py and train_binary.py set; the run's tags are read where a version lacks one
_IDENTITY_KEYS = ("dataset.path", "dataset.sha256", "dataset.feature_service", "dataset.snapshot_range")
_HISTORY_REASON_CHARS = 1000  # keeps one entry far below the 5,000-character tag limit


def now_utc() -> str:
    """The current instant, ISO 8601 in UTC to the second (how every promotion record says *when*)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def current_user() -> str:
    """Who runs this command (the login name), for *who promoted*."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return os.environ.get("USER", "unknown")


def acting_user(settings: Settings) -> str:
    """Who the audit trail names: with ``mlflow.auth`` the MLflow user the server authenticated, else the
    login name (:func:`current_user`)."""
    from shopsight.platform.mlflow_server import authenticated_user

    user = authenticated_user(settings)
    return user.name if user is not None else current_user()


def alias_mover(settings: Settings, name: str) -> str:
    """The acting user (:func:`acting_user`), after checking, with ``mlflow.auth``, that MLflow lets it move
    the aliases of ``name`` (EDIT or MANAGE on it): checked before the gate's evaluation, so that a user
    who may not promote learns it at once and not after minutes of work.

    Raises:
        ShopsightError: the user's permission on ``name`` is below EDIT.
    """
    from shopsight.platform.mlflow_server import MOVES_ALIASES, registered_model_permission

    if not settings.mlflow.auth:
        return current_user()
    user, permission = registered_model_permission(settings, name)
    if permission != "ADMIN" and permission not in MOVES_ALIASES:
        raise ShopsightError(
            f"MLflow user {user.name!r} has {permission} on registered model {name}; moving its "
            f"{CHAMPION} alias needs EDIT or MANAGE (an MLflow admin grants it: `shopsight mlflow user "
            f"grant {user.name} --permission EDIT --model {name}`)"
        )
    return user.name


def mlflow_access_errors(command):
    """Decorate ``command(settings, name, ...)``: MLflow's refusals (HTTP 401, 403) become one-line
    ShopsightErrors naming the user and the permission it lacks, not an MlflowException's traceback
    (the check of :func:`alias_mover` comes first; this covers a grant revoked meanwhile, and a server
    with authentication that this profile does not know of)."""

    @functools.wraps(command)
    def checked(settings: Settings, name: str, *args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            return command(settings, name, *args, **kwargs)
        except MlflowException as exc:
            error = _access_error(settings, name, exc)
            if error is None:
                raise
            raise error from None

    return checked


def _access_error(settings: Settings, name: str, exc: Exception) -> ShopsightError | None:
    code = getattr(exc, "error_code", "")
    if code == "UNAUTHENTICATED":
        return ShopsightError(
            "the MLflow server refused the request without a valid login (HTTP 401): it runs with "
            "authentication, so set mlflow.auth=true and log in with MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or mlflow.credentials_file)"
        )
    if code == "PERMISSION_DENIED":
        who = os.environ.get("MLFLOW_TRACKING_USERNAME", "?")
        if settings.mlflow.auth:
            with contextlib.suppress(ShopsightError):  # the login itself failing: name what we have
                who = acting_user(settings)
        return ShopsightError(
            f"the MLflow server refused user {who!r} a change of registered model {name} (HTTP 403): "
            f"promoting and rolling back need EDIT or MANAGE on it (`shopsight mlflow user grant {who} "
            f"--permission EDIT --model {name}`, as an MLflow admin)"
        )
    return None


def registry_client(settings: Settings) -> MlflowClient:
    """A client of the profile's tracking server and registry (the local server starts if needed)."""
    import mlflow
    from mlflow import MlflowClient

    from shopsight.platform.mlflow_server import tracking_uri

    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)  # pyfunc.load_model("models:/...") resolves through the same server
    return MlflowClient(uri)


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def registered_model(client: MlflowClient, name: str):
    """The registered model ``name``; ShopsightError naming the registered ones when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _not_found(exc):
            raise
    known = [m.name for m in list_registered_models(client)]
    listing = ", ".join(known) if known else "none yet (`shopsight train` registers one)"
    raise ShopsightError(f"no registered model {name!r}; registered: {listing}")


def list_registered_models(client: MlflowClient) -> list:
    """Every registered model, by name."""
    models, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            return sorted(models, key=lambda m: m.name)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None."""
    aliases = registered_model(client, name).aliases or {}
    value = aliases.get(alias)
    return str(value) if value is not None else None


def model_version(client: MlflowClient, name: str, version: str | int):
    """One version of ``name``; ShopsightError listing the existing versions when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        # an unknown number is RESOURCE_DOES_NOT_EXIST, a non-number INVALID_PARAMETER_VALUE
        if not _not_found(exc) and getattr(exc, "error_code", "") != "INVALID_PARAMETER_VALUE":
            raise
    versions = ", ".join(v.version for v in versions_of(client, name)) or "none"
    raise ShopsightError(f"{name} has no version {version!r}; its versions: {versions}")


def versions_of(client: MlflowClient, name: str) -> list:
    """Every version of ``name``, oldest first."""
    registered_model(client, name)
    found = client.search_model_versions(f"name='{name}'")
    return sorted(found, key=lambda v: int(v.version))


@dataclass
class VersionInfo:
    """What ``models show`` tells about one version: its aliases, task, metrics, data, origin, promotions."""

    version: str
    aliases: list[str]
    task: str | None
    model_type: str | None
    metrics: dict[str, float]  # the run's test_* metrics, prefix stripped
    dataset: dict[str, str]  # dataset.* identity (version tags, else the run's tags)
    created_by: str | None  # the run's mlflow.user
    created_at: str  # the version's creation, ISO UTC
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)  # the version's own tags


def version_info(client: MlflowClient, name: str, version) -> VersionInfo:
    """Facts of one version (``version`` is a number or a ModelVersion), reading its run for the rest."""
    from mlflow.exceptions import MlflowException

    mv = version if hasattr(version, "run_id") else model_version(client, name, version)
    tags = dict(mv.tags or {})
    run_tags: dict[str, str] = {}
    params: dict[str, str] = {}
    metrics: dict[str, float] = {}
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
            run_tags, params = dict(run.data.tags), dict(run.data.params)
            metrics = {k[5:]: v for k, v in run.data.metrics.items() if k.startswith("test_")}
        except MlflowException:  # the run was deleted: the version's own tags remain
            pass
    dataset = {k: tags.get(k) or run_tags.get(k) for k in _IDENTITY_KEYS if tags.get(k) or run_tags.get(k)}
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    aliases = getattr(mv, "aliases", None)
    if not aliases:  # versions from a search come without their aliases: the registered model has them
        by_alias = registered_model(client, name).aliases or {}
        aliases = [alias for alias, v in by_alias.items() if str(v) == str(mv.version)]
    return VersionInfo(
        version=str(mv.version),
        aliases=sorted(aliases),
        task=tags.get("task") or run_tags.get("task"),
        model_type=tags.get("model") or params.get("model") or run_tags.get("model"),
        metrics=metrics,
        dataset=dataset,
        created_by=run_tags.get("mlflow.user") or mv.user_id or None,
        created_at=created,
        run_id=mv.run_id,
        tags=tags,
    )


def set_version_tags(client: MlflowClient, name: str, version: str, tags: dict[str, object]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, "" if value is None else str(value))


# ----------------------------------------------------------------------------------------- history


def read_history(client: MlflowClient, name: str) -> list[dict]:
    """The promotion and rollback entries of ``name``, oldest first."""
    tags = registered_model(client, name).tags or {}
    entries = []
    for key, value in tags.items():
        if key.startswith(HISTORY_PREFIX) and key[len(HISTORY_PREFIX) :].isdigit():
            try:
                entries.append(json.loads(value))
            except json.JSONDecodeError:
                entries.append({"n": int(key[len(HISTORY_PREFIX) :]), "action": "unreadable", "raw": value})
    return sorted(entries, key=lambda e: int(e.get("n", 0)))


def append_history(client: MlflowClient, name: str, entry: dict) -> dict:
    """Record ``entry`` as the next ``history.NNNN`` tag; returns it with its number ``n``.

    An entry says ``action`` (promote | rollback), ``at``, ``by``, ``from`` (the previous champion or
    None), ``to``, ``reason``, ``forced``, and the evaluation behind it (``metric``, ``metrics`` by
    version, ``difference`` with its bootstrap interval, ``eval``). Call it only while holding the
    :class:`RegistryLock`: numbering is read-then-write.
    """
    history = read_history(client, name)
    entry = dict(entry)
    entry["n"] = max((int(e.get("n", 0)) for e in history), default=0) + 1
    if entry.get("reason") and len(entry["reason"]) > _HISTORY_REASON_CHARS:
        entry["reason"] = entry["reason"][:_HISTORY_REASON_CHARS] + "..."
    client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{entry['n']:04d}", json.dumps(entry))
    return entry


def champion_stack(history: list[dict]) -> list[str]:
    """The champions in the order they took over, as promotions push and rollbacks pop them.

    ``[1, 2, 3]`` after promoting 1, 2, 3; a rollback then pops 3 (champion 2), a second one pops 2
    (champion 1): rolling back walks back through the champions, it does not toggle between two.
    """
    stack: list[str] = []
    for entry in history:
        if entry.get("action") == "promote":
            if not stack and entry.get("from"):
                stack.append(str(entry["from"]))
            stack.append(str(entry["to"]))
        elif entry.get("action") == "rollback" and stack:
            stack.pop()
            if not stack or stack[-1] != str(entry["to"]):  # history edited by hand: trust the entry
                stack.append(str(entry["to"]))
    return stack


def log_decision_run(
    client: MlflowClient,
    run_name: str,
    *,
    metrics: dict[str, float],
    params: dict[str, object],
    tags: dict[str, str],
    record: dict,
    log=print,
) -> str | None:
    """One run in the :data:`PROMOTIONS_EXPERIMENT` (created on first use) recording a decision already
    made: its ``metrics``, ``params``, ``tags`` (``by`` also as ``mlflow.user``, the UI's User) and
    ``record`` as ``decision.json``. Returns the run id, or None after saying, through ``log``, why the
    run could not be written: the registry already holds the decision, which stands either way."""
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    run_id = None
    try:
        experiment = client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(PROMOTIONS_EXPERIMENT)
            except MlflowException:  # created meanwhile by another command
                experiment_id = client.get_experiment_by_name(PROMOTIONS_EXPERIMENT).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run_tags = {**tags, "mlflow.user": tags.get("by", "")}
        run_id = client.create_run(experiment_id, tags=run_tags, run_name=run_name).info.run_id
        at = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), at, 0) for k, v in metrics.items() if _finite(v)],
            params=[Param(k, str(v)[:6000]) for k, v in params.items() if v is not None],
        )
        client.log_dict(run_id, record, "decision.json")
        client.set_terminated(run_id, "FINISHED")
        return run_id
    except Exception as exc:  # noqa: BLE001 - the record of a decision made; any failure is only reported
        if run_id is not None:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, "FAILED")
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        log(
            f"warning: the decision stands (the registry records it), but its run in the MLflow experiment "
            f"{PROMOTIONS_EXPERIMENT!r} could not be written: {detail}"
        )
        return None


def _finite(value) -> bool:
    import math

    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# -------------------------------------------------------------------------------------------- lock


@dataclass
class Lease:
    token: str
    action: str  # "promotion" | "rollback"
    owner: str
    since: str
    expires: float  # unix seconds
    detail: str = ""  # what it promotes ("version 3")
    # the holding process, to tell a lease whose holder died (kill -9) from one in use: its machine,
    # pid and the pid's start time (a pid is reused, the pair is not)
    host: str = ""
    pid: int = 0
    pid_started: float = 0.0

    def holder_gone(self) -> bool:
        """Whether the process holding the lease is known to be gone: it ran on this machine and its pid
        no longer runs, or now belongs to a process started at another time. A holder on another machine
        is never presumed gone: its lease expires instead."""
        import psutil

        if not self.pid or self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) > 1e-3
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:  # not ours to inspect: presume it alive
            return False

    @classmethod
    def parse(cls, text: str | None) -> Lease | None:
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError):
            return cls(token="?", action="promotion", owner="unknown", since="?", expires=0.0)

    def describe(self) -> str:
        until = datetime.fromtimestamp(self.expires, UTC).strftime("%H:%M:%S UTC")
        what = f"{self.detail}, " if self.detail else ""
        return f"{what}by {self.owner}, since {self.since}; the lock expires at {until}"


class PromotionInProgress(ShopsightError):
    """Another promotion or rollback of the same model holds its lock."""


class RegistryLock:
    """A lease on one registered model, so that two promotions (or rollbacks) of it never interleave.

    MLflow's registry has no compare-and-set, so the lease is a registered-model tag, ``promotion.lock``
    (JSON: token, action, owner, since, expiry), taken in three steps: read it (absent or expired: free;
    else fail naming the holder), write our token, wait ``settle_s``, read it again. Two commands that
    both read "free" both write; the one written last is what both read back after the wait, so exactly
    one continues and the other fails with :class:`PromotionInProgress`. That holds while a command
    writes within ``settle_s`` of reading, i.e. one registry round trip. :meth:`confirm` is called again
    right before the alias moves, and the caller also checks that the champion is still the version it
    evaluated against: a lease lost to a long stall aborts instead of overwriting.
    The lease expires after ``ttl_s``, so a command that died does not block the model for ever
    (``shopsight models unlock NAME`` clears it at once). Release deletes the tag only if it still
    holds our token.
    """

    def __init__(
        self,
        client: MlflowClient,
        name: str,
        action: str,
        ttl_s: float = 3600.0,
        settle_s: float = 1.0,
        detail: str = "",
        user: str | None = None,
    ) -> None:
        """``user``: who takes the lock (:func:`acting_user`; default: the login name)."""
        self.client, self.name, self.action = client, name, action
        self.ttl_s, self.settle_s = ttl_s, settle_s
        import psutil

        self.lease = Lease(
            token=uuid.uuid4().hex,
            action=action,
            owner=f"{user or current_user()}@{socket.gethostname()} pid {os.getpid()}",
            since=now_utc(),
            expires=time.time() + ttl_s,
            detail=detail,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=psutil.Process().create_time(),
        )
        self.took_over: Lease | None = None  # the lease of a holder that died, when this one replaced it

    def _read(self) -> Lease | None:
        return Lease.parse((registered_model(self.client, self.name).tags or {}).get(LOCK_TAG))

    def _busy(self, holder: Lease | None) -> PromotionInProgress:
        if holder is None:
            return PromotionInProgress(
                f"another promotion or rollback of {self.name} took its lock at the same moment; "
                "run the command again"
            )
        return PromotionInProgress(
            f"another {holder.action} of {self.name} is in progress ({holder.describe()}); "
            "run the command again when it has finished"
        )

    def acquire(self) -> RegistryLock:
        from mlflow.exceptions import MlflowException

        holder = self._read()
        if holder is not None and holder.token != self.lease.token and holder.expires > time.time():
            if not holder.holder_gone():
                raise self._busy(holder)
            # its command was killed mid-way: the alias moves last, after the history entry is written
            # and the lease re-confirmed, so the registry is as it was before or after that command
            self.took_over = holder
        self.lease.since, self.lease.expires = now_utc(), time.time() + self.ttl_s
        try:
            self.client.set_registered_model_tag(self.name, LOCK_TAG, json.dumps(self.lease.__dict__))
        except MlflowException as error:
            if error.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
                raise  # refused by authentication, not taken by another command
            # two first writes of the tag at once: the registry's SQL store inserts both and refuses
            # the second on its unique key, so the other command holds the lock
            holder = self._read()
            if holder is None or holder.token != self.lease.token:
                raise self._busy(holder) from error
        time.sleep(self.settle_s)
        self.confirm()
        return self

    def confirm(self) -> None:
        """Raise :class:`PromotionInProgress` unless the lease is still ours."""
        holder = self._read()
        if holder is None or holder.token != self.lease.token:
            raise self._busy(holder)

    def release(self) -> None:
        holder = self._read()
        if holder is not None and holder.token == self.lease.token:
            self.client.delete_registered_model_tag(self.name, LOCK_TAG)

    def __enter__(self) -> RegistryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def finish_interrupted(client: MlflowClient, name: str, dead: Lease) -> dict | None:
    """The last history entry when ``dead``'s command wrote it (its lock's token) and was killed before
    it moved the alias; the alias is moved to it here. The decision was made and recorded, only its last
    step was lost, so the history stays the truth. None when that command recorded nothing."""
    history = read_history(client, name)
    if not history or history[-1].get("lock") != dead.token:
        return None
    entry = history[-1]
    if alias_version(client, name, CHAMPION) != str(entry["to"]):
        client.set_registered_model_alias(name, CHAMPION, str(entry["to"]))
    return entry


def lock_holder(client: MlflowClient, name: str) -> Lease | None:
    """The lease of a promotion or rollback in progress (None when free or expired)."""
    holder = Lease.parse((registered_model(client, name).tags or {}).get(LOCK_TAG))
    return holder if holder is not None and holder.expires > time.time() else None


def break_lock(client: MlflowClient, name: str) -> Lease | None:
    """Delete the lock tag whoever holds it (for a promotion that died); returns the lease it held."""
    holder = Lease.parse((registered_model(client, name).tags or {}).get(LOCK_TAG))
    if holder is not None:
        client.delete_registered_model_tag(name, LOCK_TAG)
    return holder


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EVAL_PATH",
    "EVAL_SHA256",
    "Lease",
    "PROMOTIONS_EXPERIMENT",
    "PromotionInProgress",
    "RegistryLock",
    "VersionInfo",
    "acting_user",
    "alias_mover",
    "alias_version",
    "append_history",
    "break_lock",
    "finish_interrupted",
    "champion_stack",
    "current_user",
    "list_registered_models",
    "lock_holder",
    "log_decision_run",
    "mlflow_access_errors",
    "model_version",
    "now_utc",
    "read_history",
    "registered_model",
    "registry_client",
    "set_version_tags",
    "version_info",
    "versions_of",
]
