"""Promotion: a registered version becomes the ``champion`` that serving loads, only through a gate;
every move of the alias is recorded and can be rolled back.

The gate (:func:`promote`) evaluates the candidate (by default the ``challenger`` alias) and the current
champion on the model's frozen evaluation set with the same protocol and seed, and moves ``champion``
only if the candidate

1. loads (``mlflow.pyfunc.load_model``, as serving loads it);
2. takes inputs the feature service provides: a next-item model's signature reads ``item_ids``, which
   serving fills from ``next_item_v1``'s ``seq_item_ids``; a purchase model's fitted feature columns
   (``SnapshotFeatures``) are all fields of ``purchase_propensity_v1`` (checked against the Feast
   repository as defined in code; no running store needed);
3. predicts finite values on the evaluation set (every score the protocol computes, and the pyfunc's
   output on a sample of it);
4. is not worse on the task's primary metric than the champion by more than ``promotion.tolerance``
   (absolute): next item NDCG@10 with 100 sampled negatives (leave-one-out test), purchase ROC-AUC on
   the last snapshot day (the time split of docs/architecture.md).

The difference (candidate - champion) comes with a 95% paired bootstrap interval: both models are
evaluated on the same users (next item: the same sampled negatives, since the seed is shared) or rows
(purchase), so each resample draws units with replacement and recomputes both models' metric on them
(next item: the mean of per-user NDCG gains; purchase: ROC-AUC of the resampled rows); the interval is
the 2.5 and 97.5 percentiles of ``promotion.bootstrap_samples`` seeded resamples. It is printed and
recorded; the decision uses the observed difference and the tolerance, as the issue specifies.

The frozen evaluation set: the first promotion of a model freezes the file it evaluated on (the
candidate's training data, ``dataset.path`` of its run, unless ``--eval-data`` names another) as the
registered-model tags ``eval.path`` and ``eval.sha256``. Later promotions evaluate on exactly that
content: a changed file is refused, a moved one may be named with ``--eval-data`` (same sha256), and
re-freezing on other data is itself a forced, recorded decision (``--eval-data PATH --force --reason``).

``--force --reason TEXT`` overrides the metric comparison (and a champion that can no longer be
evaluated); never checks 1-3: a model that does not load, takes inputs serving cannot give it, or
predicts NaN would fail every request, and no reason makes that right.

Records, concurrency: see :mod:`shopsight.lifecycle.registry` (history tags, version tags, the lease).
Each decision, a refusal included, and each rollback is also one run of the MLflow experiment
``promotions`` (both evaluations, the interval, the decision, who and why), written after the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shopsight.lifecycle.registry import (
    CHALLENGER,
    CHAMPION,
    EVAL_PATH,
    EVAL_SHA256,
    RegistryLock,
    alias_mover,
    alias_version,
    append_history,
    champion_stack,
    finish_interrupted,
    log_decision_run,
    mlflow_access_errors,
    model_version,
    now_utc,
    read_history,
    registered_model,
    registry_client,
    set_version_tags,
    version_info,
)
from shopsight.platform import Settings, ShopsightError
from shopsight.training.runtime.versions import Evaluation, first_line, paired_bootstrap
from shopsight.training.tasks import TASKS, Task, get_task


@dataclass
class GateResult:
    """The outcome of ``promote``: both evaluations, the comparison, the decision and its record."""

    name: str
    task: str
    candidate: str
    champion: str | None
    metric: str
    metric_label: str
    eval_path: str
    eval_sha256: str
    tolerance: float
    candidate_eval: Evaluation
    champion_eval: Evaluation | None = None
    difference: dict[str, float] | None = None  # mean, lo, hi, units
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    forced: bool = False
    promoted: bool = False
    freeze: bool = False
    entry: dict | None = None
    by: str = ""  # who promotes (registry.acting_user): the MLflow user with mlflow.auth


# ------------------------------------------------------------------------------------ evaluation


def gated(task: Task) -> bool:
    """Whether the gate can judge versions of ``task``: its package evaluates registered versions."""
    return hasattr(task.code, "evaluate_version")


def evaluate_version(
    settings: Settings, name: str, version: str, task: str, data: Path, seed: int
) -> Evaluation:
    """The gate's evaluation of ``models:/name/version`` on ``data`` with the task's own protocol."""
    chosen = get_task(task)
    try:
        return chosen.code.evaluate_version(
            settings, chosen, f"models:/{name}/{version}", version, Path(data), seed
        )
    except ShopsightError:
        raise  # the data, not the model: the message says what to fix
    except Exception as exc:  # noqa: BLE001 - a model that loads but cannot predict fails the gate
        failed = Evaluation(version)
        failed.checks["finite"] = (False, f"predicting failed: {type(exc).__name__}: {first_line(exc)}")
        return failed


def compare(candidate: Evaluation, champion: Evaluation, task: str, samples: int, seed: int) -> dict:
    """Candidate minus champion on the primary metric, over the units both were evaluated on, with the
    paired bootstrap interval (the task says how its units pair)."""
    statistic, units = get_task(task).code.paired_difference(candidate, champion)
    return paired_bootstrap(statistic, units, samples, seed)


# ------------------------------------------------------------------------------- the frozen set


def _sha256(path: Path) -> str:
    from shopsight.training.runtime.tracking import dataset_identity

    return dataset_identity(path)["dataset.sha256"]


def evaluation_set(
    tags: dict[str, str], name: str, candidate, eval_data: Path | None, force: bool
) -> tuple[Path, str, bool]:
    """Where to evaluate: ``(path, sha256, freeze)``; ``freeze`` when this promotion (re)freezes it.

    ``candidate`` is the candidate's :class:`~shopsight.lifecycle.registry.VersionInfo`.
    """
    frozen_path, frozen_sha = tags.get(EVAL_PATH), tags.get(EVAL_SHA256)
    if eval_data is not None and not Path(eval_data).exists():
        raise ShopsightError(f"--eval-data {eval_data} does not exist")
    if frozen_sha:
        if eval_data is not None:
            sha = _sha256(eval_data)
            if sha == frozen_sha:
                return Path(eval_data), sha, False  # the frozen content, moved
            if not force:
                raise ShopsightError(
                    f"--eval-data {eval_data} is not the frozen evaluation set of {name} ({frozen_path}, "
                    f"sha256 {frozen_sha[:12]}); re-freezing it on other data needs --force --reason TEXT"
                )
            return Path(eval_data), sha, True
        redo = "or re-freeze with --eval-data PATH --force --reason TEXT"
        if not Path(frozen_path).exists():
            raise ShopsightError(
                f"the frozen evaluation set of {name}, {frozen_path}, is gone: restore it, give its new "
                f"place with --eval-data PATH, {redo}"
            )
        sha = _sha256(Path(frozen_path))
        if sha != frozen_sha:
            raise ShopsightError(
                f"the frozen evaluation set of {name} changed: {frozen_path} has sha256 {sha[:12]}, "
                f"frozen {frozen_sha[:12]}; restore it, {redo}"
            )
        return Path(frozen_path), sha, False
    if eval_data is not None:
        return Path(eval_data), _sha256(eval_data), True
    path, trained = candidate.dataset.get("dataset.path"), candidate.dataset.get("dataset.sha256")
    if not path:
        raise ShopsightError(
            f"version {candidate.version} of {name} records no training data (dataset.path); "
            "give the evaluation set with --eval-data PATH"
        )
    if not Path(path).exists():
        raise ShopsightError(
            f"{path}, the data version {candidate.version} was trained on, is gone; "
            "give the evaluation set with --eval-data PATH"
        )
    sha = _sha256(Path(path))
    if trained and sha != trained:
        raise ShopsightError(
            f"{path} changed since version {candidate.version} was trained on it (sha256 {sha[:12]}, "
            f"trained on {trained[:12]}); give the evaluation set with --eval-data PATH"
        )
    return Path(path), sha, True


# ---------------------------------------------------------------------------------- the commands


def resolve_candidate(client, name: str, version: str | None) -> str:
    """``version``, or the version of the ``challenger`` alias."""
    if version is not None:
        return str(model_version(client, name, version).version)
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise ShopsightError(f"{name} has no {CHALLENGER} alias; name the version with --version V")
    return challenger


@mlflow_access_errors
def promote(
    settings: Settings,
    name: str,
    version: str | None = None,
    *,
    force: bool = False,
    reason: str | None = None,
    eval_data: Path | None = None,
    log: Callable[[str], None] = print,
) -> GateResult:
    """Run the gate for ``version`` (default: the challenger) of ``name`` and move ``champion`` if it passes
    (or if ``force``, with ``reason``, overrides the metric comparison).

    Returns the :class:`GateResult`; ``promoted`` says whether the alias moved (a refusal is a result,
    not an exception, so that the caller can print the evaluation behind it).

    Raises:
        ShopsightError: unknown model or version, no task, the evaluation set gone or changed, the
            candidate already champion, ``force`` without ``reason``.
        PromotionInProgress: another promotion or rollback of ``name`` holds the lock.
    """
    if force and not (reason or "").strip():
        raise ShopsightError("--force needs --reason TEXT: a forced promotion is recorded with its reason")
    cfg = settings.promotion
    client = registry_client(settings)
    candidate = resolve_candidate(client, name, version)
    by = alias_mover(settings, name)  # may this user move champion? asked before minutes of evaluation
    info = version_info(client, name, candidate)
    judged = [t.name for t in TASKS.values() if gated(t)]
    task = (info.task or "").replace("-", "_")
    if task not in judged:
        raise ShopsightError(
            f"version {candidate} of {name} has no known task (tag task={info.task!r}; expected "
            f"{' or '.join(judged)}): set the version tag `task`"
        )
    metric, label = get_task(task).metric.key, get_task(task).metric.label
    with RegistryLock(
        client, name, "promotion", cfg.lock_ttl_s, cfg.lock_settle_s, detail=f"version {candidate}", user=by
    ) as lock:
        _take_over(client, name, lock, log)
        champion = alias_version(client, name, CHAMPION)
        if champion == candidate:
            raise ShopsightError(f"version {candidate} of {name} is already the {CHAMPION}")
        tags = dict(registered_model(client, name).tags or {})
        path, sha, freeze = evaluation_set(tags, name, info, eval_data, force)
        result = GateResult(
            name=name, task=task, candidate=candidate, champion=champion, metric=metric,
            metric_label=label, eval_path=str(path), eval_sha256=sha, tolerance=cfg.tolerance,
            candidate_eval=Evaluation(candidate), forced=force, freeze=freeze, by=by,
        )  # fmt: skip
        log(f"evaluating candidate version {candidate} ({task}) on {path} ...")
        result.candidate_eval = evaluate_version(settings, name, candidate, task, path, cfg.seed)
        _decide(settings, result, log)
        result.forced = force and not result.passed  # forced = the gate was overridden
        if not result.passed and not (force and result.candidate_eval.ok):
            set_version_tags(
                client, name, candidate,
                {"gate.status": "refused", "gate.reason": "; ".join(result.reasons)[:4000],
                 "gate.checked_at": now_utc()},
            )  # fmt: skip
        else:
            lock.confirm()
            now_champion = alias_version(client, name, CHAMPION)
            if now_champion != champion:
                raise ShopsightError(
                    f"the {CHAMPION} of {name} changed during the evaluation (version {champion} -> "
                    f"{now_champion}); run the promotion again"
                )
            _record_promotion(client, result, reason, lock.lease.token)
    # after the lock: the registry holds the decision; its run is the record the tracking UI shows
    _log_gate_run(client, result, reason, settings, log)
    return result


def _take_over(client, name: str, lock: RegistryLock, log: Callable[[str], None]) -> None:
    """After taking the lock of a command that died: say so, and finish its last step if it had recorded
    its decision (the history entry) but not yet moved the alias."""
    if lock.took_over is None:
        return
    log(f"took over the lock of a {lock.took_over.action} that died ({lock.took_over.describe()})")
    finished = finish_interrupted(client, name, lock.took_over)
    if finished is not None:
        log(f"finished its {finished['action']}: {CHAMPION} is version {finished['to']}, as its history says")


def _decide(settings: Settings, result: GateResult, log) -> None:
    """Fill in the champion's evaluation, the comparison, ``passed`` and the ``reasons`` against."""
    cfg, cand = settings.promotion, result.candidate_eval
    result.reasons = [f"the candidate fails the gate: {f}" for f in cand.failures()]
    if not cand.ok:
        return
    if result.champion is None:
        result.passed = True
        return
    log(f"evaluating champion version {result.champion} on the same data ...")
    champ = evaluate_version(
        settings, result.name, result.champion, result.task, Path(result.eval_path), cfg.seed
    )
    result.champion_eval = champ
    if not champ.ok or result.metric not in champ.metrics:
        result.reasons.append(
            f"the champion (version {result.champion}) cannot be evaluated on the frozen set "
            f"({'; '.join(champ.failures()) or 'no metric'}); --force --reason TEXT replaces it anyway"
        )
        return
    log(f"paired bootstrap of the difference ({cfg.bootstrap_samples} resamples) ...")
    result.difference = compare(cand, champ, result.task, cfg.bootstrap_samples, cfg.seed)
    _judge(settings, result)


def _judge(settings: Settings, result: GateResult) -> None:
    """The metric comparison of the gate, on evaluations offline or online: ``passed``, or the reason
    against."""
    cfg, cand, champ, diff = (
        settings.promotion,
        result.candidate_eval,
        result.champion_eval,
        result.difference,
    )
    if diff["mean"] < -cfg.tolerance:
        result.reasons.append(
            f"{result.metric_label} {cand.metrics[result.metric]:.4f} is worse than the champion's "
            f"{champ.metrics[result.metric]:.4f} by {-diff['mean']:.4f} (tolerance {cfg.tolerance:g}; "
            f"difference {diff['mean']:+.4f}, 95% CI [{diff['lo']:+.4f}, {diff['hi']:+.4f}])"
        )
        return
    guard = get_task(result.task).guard
    if guard is not None and guard.key in cand.metrics and guard.key in champ.metrics:
        worse = cand.metrics[guard.key] - champ.metrics[guard.key]
        if not guard.higher_is_better and worse > cfg.calibration_tolerance:
            result.reasons.append(
                f"{guard.label} {cand.metrics[guard.key]:.4f} is worse than the champion's "
                f"{champ.metrics[guard.key]:.4f} by {worse:.4f} (tolerance {cfg.calibration_tolerance:g}): "
                "its probabilities mean less than the champion's"
            )
            return
    result.passed = True


def _record_promotion(client, result: GateResult, reason: str | None, token: str) -> None:
    """The history entry first, the alias last: a command killed in between leaves an entry (with its
    lock's token) that the next command to take the lock finishes (:func:`finish_interrupted`), and one
    killed before the entry leaves the registry as it was."""
    name, candidate, champion = result.name, result.candidate, result.champion
    at, by = now_utc(), result.by
    gate = "passed" if result.passed else "overridden"
    if result.passed and champion is None:
        gate = "first"
    metrics = {candidate: result.candidate_eval.metrics.get(result.metric)}
    if result.champion_eval is not None and result.metric in result.champion_eval.metrics:
        metrics[champion] = result.champion_eval.metrics[result.metric]
    text = (reason or "").strip() or ("first champion" if gate == "first" else "gate passed")
    result.entry = append_history(
        client, name,
        {"action": "promote", "at": at, "by": by, "from": champion, "to": candidate, "task": result.task,
         "metric": result.metric, "metrics": metrics, "difference": result.difference,
         "tolerance": result.tolerance, "gate": gate, "forced": result.forced, "reason": text,
         "overridden": result.reasons if result.forced and not result.passed else [],
         "eval": {"path": result.eval_path, "sha256": result.eval_sha256, "frozen": result.freeze},
         "lock": token},
    )  # fmt: skip
    if result.freeze:
        for key, value in {EVAL_PATH: result.eval_path, EVAL_SHA256: result.eval_sha256,
                           "eval.frozen_at": at, "eval.frozen_by": by}.items():  # fmt: skip
            client.set_registered_model_tag(name, key, value)
    set_version_tags(
        client, name, candidate,
        {"promoted_at": at, "promoted_by": by, "promoted_from": champion or "none",
         "promotion_action": "promote", "promotion_reason": text, "forced": str(result.forced).lower(),
         "gate.status": gate, "gate.reason": "; ".join(result.reasons)[:4000], "gate.checked_at": at},
    )  # fmt: skip
    if champion is not None:
        set_version_tags(
            client, name, champion, {"demoted_at": at, "demoted_by": by, "replaced_by": candidate}
        )
    client.set_registered_model_alias(name, CHAMPION, candidate)
    result.promoted = True


def _log_gate_run(client, result: GateResult, reason: str | None, settings: Settings, log) -> None:
    """The gate's decision as a run of the ``promotions`` experiment: both evaluations, the interval, the
    decision (first, passed, overridden or refused), who and why."""
    cand, champ = result.candidate_eval, result.champion_eval
    metrics = {f"candidate_{_metric_name(k)}": v for k, v in cand.metrics.items()}
    if champ is not None:
        metrics |= {f"champion_{_metric_name(k)}": v for k, v in champ.metrics.items()}
    if result.difference is not None:
        metrics |= {f"difference{'' if k == 'mean' else '_' + k}": v for k, v in result.difference.items()}
    record = result.entry
    if record is None:  # refused: the registry keeps the reasons as version tags, the run keeps them all
        values = {result.candidate: cand.metrics.get(result.metric)}
        if champ is not None:
            values[result.champion] = champ.metrics.get(result.metric)
        record = {
            "action": "promote", "at": now_utc(), "by": result.by, "from": result.champion,
            "to": result.candidate, "task": result.task, "metric": result.metric, "metrics": values,
            "difference": result.difference, "tolerance": result.tolerance, "gate": "refused",
            "reasons": result.reasons, "eval": {"path": result.eval_path, "sha256": result.eval_sha256},
        }  # fmt: skip
    decision = record["gate"]
    why = "; ".join(result.reasons) if decision == "refused" else record.get("reason") or reason or ""
    tags = {
        "model": result.name, "task": result.task, "action": "promote", "decision": decision,
        "version.from": result.champion or "none", "version.to": result.candidate,
        "promoted": str(result.promoted).lower(), "forced": str(result.forced).lower(), "by": result.by,
        "reason": why[:5000],
    }  # fmt: skip
    for check, (ok, why_not) in cand.checks.items():  # loads, inputs, finite
        tags[f"check.{check}"] = "ok" if ok else f"failed: {why_not}"[:5000]
    if "n" in record:
        tags["history.n"] = str(record["n"])
    log_decision_run(
        client,
        f"promote {result.name} {result.champion or '-'} -> {result.candidate}: {decision}",
        metrics=metrics,
        params={
            "metric": result.metric,
            "tolerance": result.tolerance,
            "bootstrap_samples": settings.promotion.bootstrap_samples,
            "seed": settings.promotion.seed,
            "eval.path": result.eval_path,
            "eval.sha256": result.eval_sha256,
            "eval.frozen": result.freeze,
        },
        tags=tags,
        record=record,
        log=log,
    )


def _metric_name(key: str) -> str:
    from shopsight.training.runtime.tracking import mlflow_name

    return mlflow_name(key)


@dataclass
class OnlineEvidence:
    """How a challenger and the champion did on the same window of served answers (``shopsight
    monitor``): their online metrics, and the challenger's difference on the primary metric with its
    interval (paired for a shadow, two groups for a canary)."""

    task: str
    candidate: str
    champion: str
    metric: str
    candidate_metrics: dict[str, float]
    champion_metrics: dict[str, float]
    difference: dict[str, float] | None  # mean, lo, hi, units; None: the candidate answered nothing
    window: str  # which answers, and the events that labelled them
    why_not: str = ""  # why there is no comparison


@mlflow_access_errors
def promote_online(
    settings: Settings,
    name: str,
    evidence: OnlineEvidence,
    *,
    force: bool = False,
    reason: str | None = None,
    log: Callable[[str], None] = print,
) -> GateResult:
    """The gate on outcomes: move ``champion`` to the challenger that answered beside it only when its
    online primary metric is not worse than the champion's over the same window, by the same tolerance
    (and calibration guard), with the same records (history entry, version tags, a ``promotions`` run) as
    :func:`promote`. ``eval.path`` of the record names the window instead of a file.

    Raises:
        ShopsightError: the champion moved since the evidence was gathered, ``force`` without ``reason``.
        PromotionInProgress: another promotion or rollback of ``name`` holds the lock.
    """
    if force and not (reason or "").strip():
        raise ShopsightError("--force needs --reason TEXT: a forced promotion is recorded with its reason")
    cfg = settings.promotion
    client = registry_client(settings)
    by = alias_mover(settings, name)
    task = get_task(evidence.task)
    candidate_eval = Evaluation(evidence.candidate, metrics=dict(evidence.candidate_metrics))
    answered = evidence.difference is not None and evidence.metric in evidence.candidate_metrics
    candidate_eval.checks["online"] = (answered, evidence.why_not or "no labelled answers in the window")
    with RegistryLock(
        client, name, "promotion", cfg.lock_ttl_s, cfg.lock_settle_s,
        detail=f"version {evidence.candidate} (online)", user=by,
    ) as lock:  # fmt: skip
        _take_over(client, name, lock, log)
        champion = alias_version(client, name, CHAMPION)
        if champion != evidence.champion:
            raise ShopsightError(
                f"the {CHAMPION} of {name} is version {champion}, not version {evidence.champion} whose "
                "answers were compared: monitor the window again"
            )
        if champion == evidence.candidate:
            raise ShopsightError(f"version {evidence.candidate} of {name} is already the {CHAMPION}")
        result = GateResult(
            name=name, task=task.name, candidate=evidence.candidate, champion=champion,
            metric=evidence.metric, metric_label=f"online {evidence.metric}",
            eval_path=f"online: {evidence.window}", eval_sha256="", tolerance=cfg.tolerance,
            candidate_eval=candidate_eval, forced=force, by=by,
        )  # fmt: skip
        result.champion_eval = Evaluation(champion, metrics=dict(evidence.champion_metrics))
        result.difference = evidence.difference
        result.reasons = [f"the candidate fails the gate: {f}" for f in candidate_eval.failures()]
        if candidate_eval.ok:
            _judge(settings, result)
        result.forced = force and not result.passed
        if result.passed or (force and candidate_eval.ok):
            lock.confirm()
            _record_promotion(client, result, reason, lock.lease.token)
        else:
            set_version_tags(
                client, name, evidence.candidate,
                {"gate.status": "refused", "gate.reason": "; ".join(result.reasons)[:4000],
                 "gate.checked_at": now_utc()},
            )  # fmt: skip
    _log_gate_run(client, result, reason, settings, log)
    return result


@mlflow_access_errors
def rollback(
    settings: Settings, name: str, reason: str | None = None, log: Callable[[str], None] = print
) -> dict:
    """Move ``champion`` back to the champion before the current one; returns the history entry.

    The champions form a stack (promotions push, rollbacks pop: see
    :func:`~shopsight.lifecycle.registry.champion_stack`), so repeated rollbacks walk further back.
    No gate: a rollback returns to a version that was champion before.

    Raises:
        ShopsightError: no champion, no previous one, the alias moved outside ``models promote``, or the
            previous version was deleted.
        PromotionInProgress: another promotion or rollback of ``name`` holds the lock.
    """
    cfg = settings.promotion
    client = registry_client(settings)
    registered_model(client, name)
    user = alias_mover(settings, name)
    with RegistryLock(client, name, "rollback", cfg.lock_ttl_s, cfg.lock_settle_s, user=user) as lock:
        _take_over(client, name, lock, log)
        champion = alias_version(client, name, CHAMPION)
        if champion is None:
            raise ShopsightError(f"{name} has no {CHAMPION} to roll back")
        history = read_history(client, name)
        stack = champion_stack(history)
        if not stack or stack[-1] != champion:
            said = f"version {stack[-1]}" if stack else "no champion"
            raise ShopsightError(
                f"the {CHAMPION} of {name} is version {champion} but its promotion history says {said}: "
                "the alias was moved outside `shopsight models promote`; promote the version you want"
            )
        if len(stack) < 2:
            raise ShopsightError(f"{name} has no previous {CHAMPION}: version {champion} is its first")
        target = stack[-2]
        model_version(client, name, target)  # still there
        known: dict[str, float] = {}
        for entry in history:  # the latest frozen-set value of each version, for the record
            known.update({str(k): v for k, v in (entry.get("metrics") or {}).items() if v is not None})
        lock.confirm()
        if alias_version(client, name, CHAMPION) != champion:
            raise ShopsightError(f"the {CHAMPION} of {name} changed meanwhile; run the rollback again")
        at, by = now_utc(), user
        text = (reason or "").strip() or "rollback"
        last = next((e for e in reversed(history) if e.get("metric")), {})
        entry = append_history(
            client, name,
            {"action": "rollback", "at": at, "by": by, "from": champion, "to": target,
             "task": last.get("task"), "metric": last.get("metric"),
             "metrics": {v: known[v] for v in (target, champion) if v in known}, "difference": None,
             "gate": "rollback", "forced": False, "reason": text, "lock": lock.lease.token},
        )  # fmt: skip
        set_version_tags(
            client, name, target,
            {"promoted_at": at, "promoted_by": by, "promoted_from": champion, "promotion_action": "rollback",
             "promotion_reason": text, "forced": "false"},
        )  # fmt: skip
        set_version_tags(client, name, champion, {"rolled_back_at": at, "rolled_back_by": by,
                                                  "rollback_reason": text})  # fmt: skip
        client.set_registered_model_alias(name, CHAMPION, target)  # last: see _record_promotion
    metric, values = entry.get("metric"), entry.get("metrics") or {}
    metrics = {}
    if metric:  # the frozen-set values the history knows: the restored version's and the one rolled back
        metrics = {f"restored_{_metric_name(metric)}": values.get(target),
                   f"champion_{_metric_name(metric)}": values.get(champion)}  # fmt: skip
    log_decision_run(
        client,
        f"rollback {name} {champion} -> {target}",
        metrics=metrics,
        params={"metric": metric} if metric else {},
        tags={
            "model": name,
            "task": entry.get("task") or "",
            "action": "rollback",
            "decision": "rollback",
            "version.from": champion,
            "version.to": target,
            "promoted": "true",
            "forced": "false",
            "by": by,
            "reason": text,
            "history.n": str(entry["n"]),
        },
        record=entry,
        log=log,
    )
    return entry


__all__ = [
    "GateResult",
    "compare",
    "evaluate_version",
    "evaluation_set",
    "gated",
    "promote",
    "resolve_candidate",
    "rollback",
]
