"""The serving logic, free of any web or cluster framework: feature rows -> tensors -> scores -> responses.

A predictor is given a feature reader (anything with ``read(user_ids) -> {feature: [value per user]}``,
in production :class:`~shopsight.features.online.OnlineFeatureReader` over the Feast online store) and the
loaded models, and answers a *batch* of requests at once (``@serve.batch`` hands it one). It decides, per
request, which model answers (the champion, or the challenger for a seeded random canary share), scores
the challenger in shadow when asked (logged and counted, never returned), and falls back to item
popularity for a user whose history the model does not know, or for every user while the online store
cannot be read (the answer says so; see :meth:`_Predictor._read`).

Models are swapped whole: :class:`Served` is immutable and the predictor replaces its reference in one
assignment (atomic in CPython). A batch reads the reference once, so requests in flight finish on the
models they started with while the next batch already uses the new champion: a promotion drops nothing.
:class:`ModelWatcher` does the swapping from a background thread, polling the registry's aliases.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel

from shopsight.serving.schemas import (
    ModelRef,
    PropensityRequest,
    PropensityResponse,
    RecommendationRequest,
    RecommendationResponse,
    ScoredItem,
    ServedModel,
    ServedVersion,
    UserProbability,
)

log = logging.getLogger("shopsight.serving")
shadow_log = logging.getLogger("shopsight.serving.shadow")

CHAMPION, CHALLENGER = "champion", "challenger"
CANARY, SHADOW = "canary", "shadow"  # how the prediction log names a challenger's answers
SNAPSHOT = "event_timestamp"  # the column a user-snapshot pyfunc reads "now" from
_LIST_FEATURES = {"top_categories", "seq_item_ids", "seq_category_ids", "seq_behaviors", "seq_ts"}


class FeatureReader(Protocol):
    feature_names: Sequence[str]  # what ``read`` returns besides user_id (the columns of an empty answer)

    def read(self, user_ids: Sequence[int]) -> dict[str, list]: ...


@dataclass(frozen=True)
class Popularity:
    """The fallback ranking: item ids, most popular first, and their scores (events in the widest window)."""

    item_ids: np.ndarray
    scores: np.ndarray

    def top(self, k: int, exclude: set[int]) -> tuple[list[int], list[float]]:
        items, scores = [], []
        for item, score in zip(self.item_ids.tolist(), self.scores.tolist(), strict=True):
            if item in exclude:
                continue
            items.append(int(item))
            scores.append(float(score))
            if len(items) == k:
                break
        return items, scores


@dataclass(frozen=True)
class LoadedModel:
    """A registered model version loaded in memory (the task's pyfunc)."""

    name: str
    version: str
    alias: str
    model: Any
    run_id: str | None = None
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    popularity: Popularity | None = None  # ranking models only

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, alias=self.alias)


@dataclass(frozen=True)
class Served:
    """What a predictor serves right now; replaced whole, never changed in place."""

    champion: LoadedModel | None = None
    challenger: LoadedModel | None = None


@dataclass(frozen=True)
class Routing:
    """Traffic between champion and challenger: a canary share and/or shadow scoring."""

    canary_share: float = 0.0
    shadow: bool = False
    seed: int = 0

    @property
    def needs_challenger(self) -> bool:
        return self.canary_share > 0 or self.shadow


@dataclass(frozen=True)
class Answered:
    """One user's answer as the prediction log keeps it: who answered, from what, and what."""

    alias: str  # champion | canary | shadow
    version: str
    user_id: int
    features: dict[str, Any]
    items: list[int] | None = None
    scores: list[float] | None = None
    probability: float | None = None
    source: str = "model"


@dataclass(frozen=True)
class ShadowResult:
    """Champion vs challenger on the same request: whether they agree, and by how much they differ."""

    agree: bool
    difference: float  # recommendations: 1 - overlap of the top k; propensity: mean |p - p'|
    challenger_version: str


@dataclass
class Outcome:
    """One request's answer, plus what the HTTP layer reports about it (status, timings, metrics)."""

    response: Any = None
    status: int = 200
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, for the whole batch
    batch_size: int = 1
    fallbacks: int = 0
    features_unavailable: bool = False  # answered without features: the online store could not be read
    shadow: ShadowResult | None = None
    # what the prediction log keeps: filled only while the predictor's ``log_answers`` is on, and dropped
    # by the replica once logged (it holds the features: not worth shipping back to the ingress)
    answered: list[Answered] | None = None
    as_of: datetime | None = None

    @classmethod
    def unavailable(cls, message: str, batch_size: int) -> Outcome:
        return cls(status=503, error=message, batch_size=batch_size)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Predictor:
    """What every predictor kind shares: the served models, their routing, the answer to a batch."""

    kind = ""  # the predictor kind a task's route names (``Route.predictor``)
    request_model: type = BaseModel
    response_model: type = BaseModel

    def __init__(
        self,
        reader: FeatureReader,
        registered_name: str,
        routing: Routing | None = None,
        endpoint: str = "",
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.reader = reader
        self.clock = clock  # the time an answer describes (a replay of past or simulated days sets it)
        self.registered_name = registered_name
        self.endpoint = endpoint or registered_name  # how shadow logs name the route
        self._served = Served()
        self.routing = routing or Routing()
        self._rng = random.Random(self.routing.seed)
        # shown to clients (/v1/models, 503s, /healthz): short, with no file path or registry internals;
        # the whole error is in the replica's log
        self.last_error: str | None = None
        self.champion_error: str | None = None  # why the champion alias's version is not the one served
        self._store_down = False  # the last read of the online store failed (logged once per outage)
        self.log_answers = False  # fill ``Outcome.answered`` (the prediction log is on)

    @property
    def served(self) -> Served:
        return self._served

    def swap(self, **slots: LoadedModel | None) -> None:
        """Replace the champion and/or challenger in one reference assignment."""
        self._served = dataclasses.replace(self._served, **slots)

    def set_routing(self, routing: Routing) -> None:
        if routing.seed != self.routing.seed:
            self._rng = random.Random(routing.seed)
        self.routing = routing

    def describe(self) -> ServedModel:
        served = self._served

        def version(loaded: LoadedModel | None) -> ServedVersion | None:
            if loaded is None:
                return None
            return ServedVersion(version=loaded.version, run_id=loaded.run_id, loaded_at=loaded.loaded_at)

        return ServedModel(
            name=self.registered_name,
            champion=version(served.champion),
            challenger=version(served.challenger),
            canary_share=self.routing.canary_share,
            shadow=self.routing.shadow,
            error=self.last_error,
            champion_error=self.champion_error,
        )

    def answer(self, requests: Sequence[Any]) -> list[Outcome]:
        """One outcome per request of the batch."""
        raise NotImplementedError

    def _read(self, user_ids: Sequence[int]) -> tuple[dict[str, list], bool]:
        """The users' online features and whether the store could be read.

        An online store that is down or slow is not a 5xx: its read fails fast (the Redis client's timeouts
        are short and it does not retry, see ``shopsight.features.store``) and every user is answered as one
        without history (the fallback), the answer saying so (``features_unavailable``). Every batch reads
        the store again, so answers use features as soon as it is back, with no restart. Logged once per
        outage, not per request.
        """
        try:
            features = self.reader.read(user_ids)
        except Exception as exc:  # noqa: BLE001 - whatever the store raises (connection, timeout, ...)
            if not self._store_down:
                log.warning(
                    "%s: the online store cannot be read, answering without features: %s: %s",
                    self.registered_name,
                    type(exc).__name__,
                    exc,
                )
                self._store_down = True
            empty = [None] * len(user_ids)
            names = getattr(self.reader, "feature_names", ())
            return {"user_id": list(user_ids), **{name: list(empty) for name in names}}, False
        if self._store_down:
            log.warning("%s: the online store answers again", self.registered_name)
            self._store_down = False
        return features, True

    def _variants(self, n: int, served: Served) -> list[str]:
        share = self.routing.canary_share
        if served.challenger is None or share <= 0:
            return [CHAMPION] * n
        return [CHALLENGER if self._rng.random() < share else CHAMPION for _ in range(n)]

    def _no_champion(self) -> str:
        why = f" (last problem: {self.last_error})" if self.last_error else ""
        return (
            f"no champion of {self.registered_name} is loaded yet: promote a version to the alias "
            f"'champion' (`shopsight models promote`){why}"
        )


class RecommendationPredictor(_Predictor):
    """Top-k items of users, from their ``seq_item_ids`` feature (the ``ranking`` kind)."""

    kind = "ranking"
    request_model = RecommendationRequest
    response_model = RecommendationResponse
    features = ("seq_item_ids",)  # what it reads of the task's feature service

    def answer(self, requests: Sequence[RecommendationRequest]) -> list[Outcome]:
        n, served = len(requests), self._served
        if served.champion is None:
            return [Outcome.unavailable(self._no_champion(), n) for _ in requests]
        started = time.perf_counter()
        features, read = self._read([r.user_id for r in requests])
        as_of = self.clock()
        histories = features.get("seq_item_ids") or [None] * n
        looked_up = time.perf_counter()
        variants = self._variants(n, served)
        answers: list[Any] = [None] * n
        for variant, loaded in ((CHAMPION, served.champion), (CHALLENGER, served.challenger)):
            rows = [i for i, v in enumerate(variants) if v == variant]
            if rows:
                results = recommend_items(
                    loaded,
                    [histories[i] for i in rows],
                    [requests[i].k for i in rows],
                    [requests[i].exclude_seen for i in rows],
                )
                for i, result in zip(rows, results, strict=True):
                    answers[i] = (loaded, *result)
        scored = time.perf_counter()
        outcomes = []
        for request, (loaded, items, scores, source) in zip(requests, answers, strict=True):
            response = RecommendationResponse(
                user_id=request.user_id,
                items=[ScoredItem(item_id=i, score=s) for i, s in zip(items, scores, strict=True)],
                model=loaded.ref(),
                fallback=source != "model",
                source=source,
                features_unavailable=not read,
            )
            outcome = Outcome(
                response=response,
                batch_size=n,
                fallbacks=int(source != "model"),
                features_unavailable=not read,
                as_of=as_of,
            )
            if self.log_answers:
                alias = CHAMPION if loaded is served.champion else CANARY
                used = {"seq_item_ids": histories[len(outcomes)]}
                outcome.answered = [
                    Answered(alias, loaded.version, request.user_id, used, items, scores, source=source)
                ]
            outcomes.append(outcome)
        timings = {"features": looked_up - started, "model": scored - looked_up}
        if self.routing.shadow and served.challenger is not None:
            self._shadow(served.challenger, requests, histories, variants, outcomes)
            timings["shadow"] = time.perf_counter() - scored
        for outcome in outcomes:
            outcome.timings = timings
        return outcomes

    def _shadow(self, challenger, requests, histories, variants, outcomes) -> None:
        rows = [i for i, v in enumerate(variants) if v == CHAMPION]
        if not rows:
            return
        results = recommend_items(
            challenger,
            [histories[i] for i in rows],
            [requests[i].k for i in rows],
            [requests[i].exclude_seen for i in rows],
        )
        for i, (items, scores, source) in zip(rows, results, strict=True):
            if outcomes[i].answered is not None:
                outcomes[i].answered.append(
                    Answered(
                        SHADOW, challenger.version, requests[i].user_id, outcomes[i].answered[0].features,
                        items, scores, source=source,
                    )
                )  # fmt: skip
            served = outcomes[i].response
            mine = [item.item_id for item in served.items]
            overlap = len(set(mine) & set(items)) / max(len(mine), len(items), 1)
            agree = mine[:1] == items[:1]
            outcomes[i].shadow = ShadowResult(agree, 1.0 - overlap, challenger.version)
            shadow_log.info(
                json.dumps(
                    {
                        "endpoint": self.endpoint,
                        "user_id": requests[i].user_id,
                        "champion": served.model.version,
                        "challenger": challenger.version,
                        "champion_items": mine,
                        "challenger_items": items,
                        "challenger_source": source,
                        "overlap": round(overlap, 4),
                        "agree_top1": agree,
                    }
                )
            )


def recommend_items(
    loaded: LoadedModel, histories: Sequence[Sequence[int] | None], ks: Sequence[int], exclude: Sequence[bool]
) -> list[tuple[list[int], list[float], str]]:
    """``(items, scores, source)`` per history: the model's top k; popularity for an unknown history.

    The tensors are built exactly as :class:`~shopsight.training.next_item.pyfunc.NextItemRecommender`
    builds them (unknown items skipped, the last ``max_len`` known ones left-padded), so a response equals
    the registered pyfunc's prediction for the same history.
    """
    rec = loaded.model
    n, length = len(histories), rec.max_len
    seqs = np.zeros((n, length), dtype=np.int64)
    known_rows: list[list[int]] = []
    for row, items in enumerate(histories):
        known = [rec.index[int(i)] for i in (items or ()) if int(i) in rec.index]
        known_rows.append(known)
        tail = known[-length:]
        if tail:
            seqs[row, length - len(tail) :] = tail
    out: list[Any] = [None] * n
    with_history = [row for row in range(n) if known_rows[row]]
    without = [row for row in range(n) if not known_rows[row]]
    popularity = loaded.popularity
    for row in without:
        if popularity is not None and len(popularity.item_ids):
            seen = {int(i) for i in (histories[row] or ())} if exclude[row] else set()
            out[row] = (*popularity.top(ks[row], seen), "popularity")
    prior = [row for row in without if out[row] is None]  # no item popularity online: the network's prior
    rows = with_history + prior
    if rows:
        with torch.no_grad():
            scores = rec.model.predict(torch.as_tensor(seqs[rows])).float()  # (B, n_items + 1)
        for j, row in enumerate(rows):
            if exclude[row] and known_rows[row]:
                scores[j, known_rows[row]] = float("-inf")  # do not recommend what was just seen
        top = torch.topk(scores, min(max(ks[r] for r in rows), scores.shape[1]), dim=1)
        indices, values = top.indices.numpy(), top.values.numpy()
        for j, row in enumerate(rows):
            idx, vals = indices[j, : ks[row]], values[j, : ks[row]]
            finite = np.isfinite(vals)
            out[row] = (
                [int(i) for i in rec.item_ids[idx[finite]]],
                [float(v) for v in vals[finite]],
                "model" if known_rows[row] else "model_prior",
            )
    return out


class ProbabilityPredictor(_Predictor):
    """The probability of a task's label for each user, from the task's feature service (the
    ``probability`` kind: purchase tomorrow, churn in three days, ...)."""

    kind = "probability"
    request_model = PropensityRequest
    response_model = PropensityResponse
    features = None  # every feature of the task's service

    def answer(self, requests: Sequence[PropensityRequest]) -> list[Outcome]:
        n, served = len(requests), self._served
        if served.champion is None:
            return [Outcome.unavailable(self._no_champion(), n) for _ in requests]
        started = time.perf_counter()
        spans, ids = [], []
        for request in requests:
            spans.append((len(ids), len(ids) + len(request.user_ids)))
            ids += request.user_ids
        features, read = self._read(ids)
        as_of = self.clock()
        frame = feature_frame(features, as_of)
        has_history = _has_history(features, len(ids))
        looked_up = time.perf_counter()
        variants = self._variants(n, served)
        probabilities = np.zeros(len(ids))
        for variant, loaded in ((CHAMPION, served.champion), (CHALLENGER, served.challenger)):
            rows = [r for i, v in enumerate(variants) if v == variant for r in range(*spans[i])]
            if rows:
                probabilities[rows] = predict_probabilities(loaded, frame.iloc[rows])
        scored = time.perf_counter()
        outcomes = []
        for (lo, hi), variant in zip(spans, variants, strict=True):
            loaded = served.champion if variant == CHAMPION else served.challenger
            predictions = [
                UserProbability(
                    user_id=ids[r], probability=float(probabilities[r]), has_history=has_history[r]
                )
                for r in range(lo, hi)
            ]
            response = PropensityResponse(
                predictions=predictions, model=loaded.ref(), as_of=as_of, features_unavailable=not read
            )
            fallbacks = sum(not has_history[r] for r in range(lo, hi))
            outcome = Outcome(
                response=response,
                batch_size=n,
                fallbacks=fallbacks,
                features_unavailable=not read,
                as_of=as_of,
            )
            if self.log_answers:
                alias = CHAMPION if variant == CHAMPION else CANARY
                outcome.answered = [
                    Answered(
                        alias, loaded.version, ids[r], _row(features, r), probability=float(probabilities[r]),
                        source="model" if has_history[r] else "no_history",
                    )
                    for r in range(lo, hi)
                ]  # fmt: skip
            outcomes.append(outcome)
        timings = {"features": looked_up - started, "model": scored - looked_up}
        if self.routing.shadow and served.challenger is not None:
            rows = [r for i, v in enumerate(variants) if v == CHAMPION for r in range(*spans[i])]
            if rows:
                theirs = np.zeros(len(ids))
                theirs[rows] = predict_probabilities(served.challenger, frame.iloc[rows])
                for i, ((lo, hi), variant) in enumerate(zip(spans, variants, strict=True)):
                    if variant != CHAMPION:
                        continue
                    mine, other = probabilities[lo:hi], theirs[lo:hi]
                    if outcomes[i].answered is not None:
                        used = [a.features for a in outcomes[i].answered]
                        outcomes[i].answered += [
                            Answered(
                                SHADOW, served.challenger.version, ids[r], used[r - lo],
                                probability=float(theirs[r]),
                                source="model" if has_history[r] else "no_history",
                            )
                            for r in range(lo, hi)
                        ]  # fmt: skip
                    agree = bool(np.all((mine >= 0.5) == (other >= 0.5)))
                    outcomes[i].shadow = ShadowResult(
                        agree, float(np.mean(np.abs(mine - other))), served.challenger.version
                    )
                    shadow_log.info(
                        json.dumps(
                            {
                                "endpoint": self.endpoint,
                                "user_ids": ids[lo:hi],
                                "champion": served.champion.version,
                                "challenger": served.challenger.version,
                                "champion_probabilities": [round(float(p), 6) for p in mine],
                                "challenger_probabilities": [round(float(p), 6) for p in other],
                                "agree": agree,
                            }
                        )
                    )
            timings["shadow"] = time.perf_counter() - scored
        for outcome in outcomes:
            outcome.timings = timings
        return outcomes


PREDICTORS: dict[str, type[_Predictor]] = {
    predictor.kind: predictor for predictor in (RecommendationPredictor, ProbabilityPredictor)
}


def feature_frame(features: dict[str, list], as_of: datetime) -> pd.DataFrame:
    """The online feature rows as a user-snapshot pyfunc takes them, described as of ``as_of``."""
    frame = pd.DataFrame(features)
    for name, values in features.items():
        if name not in _LIST_FEATURES and all(v is None for v in values):
            frame[name] = np.nan  # a number nobody has: float NaN, as when some users have it
    frame[SNAPSHOT] = pd.Timestamp(as_of).tz_convert("UTC") if as_of.tzinfo else pd.Timestamp(as_of, tz="UTC")
    return frame


def _row(features: dict[str, list], r: int) -> dict[str, Any]:
    return {name: values[r] for name, values in features.items() if name != "user_id"}


def _has_history(features: dict[str, list], n: int) -> list[bool]:
    columns = [values for name, values in features.items() if name != "user_id"]
    return [any(values[r] is not None for values in columns) for r in range(n)]


def predict_probabilities(loaded: LoadedModel, frame: pd.DataFrame) -> np.ndarray:
    """The pyfunc's own ``predict`` on the rows: the same transform, network and calibration as offline."""
    return loaded.model.predict(None, frame.reset_index(drop=True))["probability"].to_numpy()


# --------------------------------------------------------------------------------------- model loading


@dataclass(frozen=True)
class VersionRef:
    """What an alias points at in the registry."""

    version: str
    run_id: str | None = None


class ModelSource(Protocol):
    """The registry, as the watcher sees it."""

    def resolve(self, alias: str) -> VersionRef | None:
        """The version the alias points at; None when the model or alias does not exist."""
        ...

    def load(self, ref: VersionRef, alias: str) -> LoadedModel: ...


class ModelWatcher:
    """Keeps a predictor's champion (and, when routing needs it, challenger) on what the aliases point at.

    ``poll_once`` resolves the aliases; a version that changed is loaded (while requests keep being
    answered by the current one) and swapped in. A version already loaded under the other alias is reused,
    so promoting the challenger switches at once. A missing alias or an unreachable registry keeps the
    current models (and is reported in ``predictor.last_error``): serving never stops because the
    registry is briefly away. A champion alias that names no version, or a version that cannot be loaded,
    is also ``predictor.champion_error`` (health is degraded), even while an older champion answers.
    What clients see of an error is a short message; the exception itself goes to the log (a loading
    error names the replica's temporary files, a registry error its URI).
    """

    def __init__(self, predictor: _Predictor, source: ModelSource, interval_s: float = 5.0) -> None:
        self.predictor = predictor
        self.source = source
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def poll_once(self) -> bool:
        """Resolve the aliases and swap in what changed; returns whether anything was swapped."""
        with self._lock:
            changed = False
            errors = []
            name = self.predictor.registered_name
            champion_error = self.predictor.champion_error  # unknown while the registry does not answer
            for alias in (CHAMPION, CHALLENGER):
                served = self.predictor.served
                current = getattr(served, alias)
                if alias == CHALLENGER and not self.predictor.routing.needs_challenger:
                    if current is not None:
                        self.predictor.swap(challenger=None)
                        changed = True
                    continue
                try:
                    ref = self.source.resolve(alias)
                except Exception as exc:  # noqa: BLE001 - the registry being away must not stop serving
                    errors.append(
                        _problem(name, f"cannot resolve {alias}", "the model registry did not answer", exc)
                    )
                    continue
                if ref is None:
                    if alias == CHALLENGER and current is not None:
                        self.predictor.swap(challenger=None)
                        changed = True
                    elif alias == CHAMPION:
                        champion_error = f"{name} has no version with alias {alias}"
                        errors.append(champion_error)
                        log.warning("%s", champion_error)
                    continue
                if current is not None and current.version == ref.version:
                    champion_error = None if alias == CHAMPION else champion_error
                    continue
                other = served.challenger if alias == CHAMPION else served.champion
                try:
                    if other is not None and other.version == ref.version:
                        loaded = dataclasses.replace(other, alias=alias)
                    else:
                        loaded = self.source.load(ref, alias)
                except Exception as exc:  # noqa: BLE001 - a broken version must not take serving down
                    why = (
                        "the model's files could not be read"
                        if isinstance(exc, OSError)
                        else f"loading failed ({type(exc).__name__})"
                    )
                    errors.append(_problem(name, f"cannot load version {ref.version} as {alias}", why, exc))
                    champion_error = errors[-1] if alias == CHAMPION else champion_error
                    continue
                self.predictor.swap(**{alias: loaded})
                champion_error = None if alias == CHAMPION else champion_error
                changed = True
                log.info(
                    "%s: now serving version %s as %s (was %s)",
                    self.predictor.registered_name,
                    ref.version,
                    alias,
                    current.version if current else "none",
                )
            self.predictor.last_error = "; ".join(errors) or None
            self.predictor.champion_error = champion_error
            return changed

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"watch-{self.predictor.registered_name}", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - keep polling whatever happens
                log.exception("model watcher of %s", self.predictor.registered_name)


def _problem(model: str, what: str, why: str, exc: BaseException) -> str:
    """Log the whole error; return what clients may see of it: what failed and why, without the
    exception's text (file paths, URIs)."""
    log.warning("%s: %s: %s: %s", model, what, type(exc).__name__, exc)
    return f"{what}: {why}; see the server log"
