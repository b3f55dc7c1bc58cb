"""Promotion: a registered version becomes the ``champion`` that serving loads, only through a gate;
every move of the alias is recorded and can be rolled back.

The gate (:func:`promote`) evaluates the candidate (by default the ``challenger`` alias) and the current
champion on the model's frozen evaluation set with the same protocol and seed, and moves ``champion``
only if the candidate

1. loads (``mlflow.pyfunc.load_model``, as serving loads it);
2. takes inputs the feature service provides: a next-item model's signature reads ``item_ids``, which
   serving fills from ``next_item_v1``'s ``seq_item_ids``; a purchase model's fitted feature columns
   (``PurchaseFeatures``) are all fields of ``purchase_propensity_v1`` (checked against the Feast
   repository as defined in code; no running store needed);
3. predicts finite values on the evaluation set (every score the protocol computes, and the pyfunc's
   output on a sample of it);
4. is not worse on the task's primary metric than the champion by more than ``promotion.tolerance``
   (absolute): next item NDCG@10 with 100 sampled negatives (leave-one-out test), purchase ROC-AUC on
   the last snapshot day (the time split of architecture.md).

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

Records, concurrency: see :mod:`shopsight.platform.registry` (history tags, version tags, the lease).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shopsight.platform import Settings, ShopsightError
from shopsight.platform.registry import (
    CHALLENGER,
    CHAMPION,
    EVAL_PATH,
    EVAL_SHA256,
    RegistryLock,
    alias_version,
    append_history,
    champion_stack,
    current_user,
    model_version,
    now_utc,
    read_history,
    registered_model,
    registry_client,
    set_version_tags,
    version_info,
)

TASKS = ("next-item", "purchase")
# task -> (metric key, how it is printed, the feature service serving reads its inputs from)
PRIMARY = {
    "next-item": ("ndcg@10", "NDCG@10 (100 sampled negatives)", "next_item_v1"),
    "purchase": ("roc_auc", "ROC-AUC (last snapshot day)", "purchase_propensity_v1"),
}
# a next-item pyfunc input column -> the next_item_v1 field serving fills it from
NEXT_ITEM_INPUTS = {"item_ids": "seq_item_ids"}
_FINITE_SAMPLE = 512  # rows sent through the pyfunc itself, as serving calls it


@dataclass
class Evaluation:
    """One version on the frozen evaluation set: the gate's checks, its metrics, its per-unit values."""

    version: str
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)  # loads/inputs/finite -> (ok, why)
    metrics: dict[str, float] = field(default_factory=dict)
    units: np.ndarray | None = None  # user ids (next item) or row numbers (purchase)
    values: np.ndarray | None = None  # per-user NDCG gains | probabilities
    labels: np.ndarray | None = None  # purchase: the rows' labels
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.checks.values())

    def failures(self) -> list[str]:
        return [f"{name}: {why}" for name, (ok, why) in self.checks.items() if not ok]


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


# ------------------------------------------------------------------------------------ evaluation


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _load(model_uri: str):
    """The pyfunc as serving loads it, and the Shopsight model inside it."""
    import mlflow

    loaded = mlflow.pyfunc.load_model(model_uri)
    return loaded, loaded.unwrap_python_model()


def _service_fields(settings: Settings, service_name: str) -> set[str]:
    from feast import FeatureService

    from shopsight.features.definitions import repository

    for obj in repository(settings):
        if isinstance(obj, FeatureService) and obj.name == service_name:
            return {f.name for p in obj.feature_view_projections for f in p.features}
    raise ShopsightError(f"the feature service {service_name} is not defined")  # pragma: no cover


def _next_item_inputs(settings: Settings, loaded) -> tuple[bool, str]:
    signature = loaded.metadata.signature
    if signature is None or signature.inputs is None:
        return False, "the model has no input signature"
    names = list(signature.inputs.input_names())
    fields = _service_fields(settings, "next_item_v1")
    unknown = [n for n in names if n not in NEXT_ITEM_INPUTS or NEXT_ITEM_INPUTS[n] not in fields]
    if unknown:
        return False, f"input(s) {', '.join(map(str, unknown))} are not served by next_item_v1"
    return True, ", ".join(f"{n} <- next_item_v1.{NEXT_ITEM_INPUTS[n]}" for n in names)


def _purchase_inputs(settings: Settings, model) -> tuple[bool, str]:
    from shopsight.training.purchase_data import SEQUENCE_COLUMNS

    features = model.features
    needed = [*features.dense_columns, *features.never_columns, *SEQUENCE_COLUMNS, "segment_id"]
    fields = _service_fields(settings, "purchase_propensity_v1")
    missing = sorted({c for c in needed if c not in fields})
    if missing:
        return False, f"feature column(s) {', '.join(missing)} are not fields of purchase_propensity_v1"
    return True, f"{len(set(needed))} columns, all fields of purchase_propensity_v1"


class _FiniteScorer:
    """The protocol's scorer, noting whether any real item ever got a non-finite score."""

    def __init__(self, score: Callable) -> None:
        self.score, self.finite = score, True

    def __call__(self, seqs, candidates):
        out = self.score(seqs, candidates)
        values = out if candidates is not None else out[:, 1:]  # column 0 is padding
        if self.finite and not bool(values.float().isfinite().all()):
            self.finite = False
        return out


def evaluate_next_item_version(
    settings: Settings, model_uri: str, version: str, data: Path, seed: int
) -> Evaluation:
    """Gate checks and the leave-one-out test of a registered next-item model on ``data``.

    Interactions with items the model never saw are dropped from the histories (as ``shopsight
    evaluate`` does); the per-user NDCG@10 gains are keyed by the shop's user ids for pairing.
    """
    import pandas as pd

    from shopsight.training.evaluation import evaluate_next_item
    from shopsight.training.loop import scorer
    from shopsight.training.next_item_model import NextItemRecommender
    from shopsight.training.sequences import LeaveOneOut, SequenceData

    started = time.perf_counter()
    result = Evaluation(version)
    try:
        loaded, model = _load(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow and torch raise many kinds for a broken model
        result.checks["loads"] = (False, _first_line(exc))
        return result
    if not isinstance(model, NextItemRecommender):
        result.checks["loads"] = (False, f"a {type(model).__name__}, not a next-item model")
        return result
    result.checks["loads"] = (True, f"{model.model_name}, {len(model.item_ids) - 1:,} items")
    result.checks["inputs"] = _next_item_inputs(settings, loaded)
    data_seqs = SequenceData.from_file(data)
    index = model.index
    sequences = [
        np.array([index[int(i)] for i in data_seqs.item_ids[seq] if int(i) in index], dtype=np.int64)
        for seq in data_seqs.sequences
    ]
    split = LeaveOneOut.split(SequenceData(sequences, data_seqs.user_ids, model.item_ids))
    users, _, _ = split.inputs("test", model.max_len)
    if not len(users):
        raise ShopsightError(f"{data}: no user has 3 or more interactions with items version {version} knows")
    score = _FiniteScorer(scorer(model.model))
    metrics = evaluate_next_item(score, split, "test", model.max_len, seed=seed)
    ranks = metrics["_ranks_sampled"]
    # the served path too: the pyfunc on a sample of the test histories, in the shop's item ids
    sample = users[:_FINITE_SAMPLE]
    histories = [model.item_ids[np.append(split.train[u], split.valid_target[u])].tolist() for u in sample]
    served = loaded.predict(pd.DataFrame({"item_ids": histories}), params={"k": 10})
    served_finite = all(np.isfinite(np.asarray(s, dtype=np.float64)).all() for s in served["scores"])
    finite = score.finite and served_finite
    result.checks["finite"] = (
        finite,
        f"every score of {len(users):,} users finite" if finite else "non-finite scores (NaN or inf)",
    )
    result.metrics = {k: float(v) for k, v in metrics.items() if not k.startswith("_")}
    result.units = data_seqs.user_ids[users]
    result.values = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
    result.seconds = time.perf_counter() - started
    return result


def evaluate_purchase_version(
    settings: Settings, model_uri: str, version: str, data: Path, seed: int
) -> Evaluation:
    """Gate checks and the purchase protocol (last snapshot day) of a registered purchase model."""
    from shopsight.training.purchase import predict_purchase, purchase_report
    from shopsight.training.purchase_data import TimeSplit, read_training_set
    from shopsight.training.purchase_model import PurchasePropensity, input_example

    started = time.perf_counter()
    result = Evaluation(version)
    try:
        loaded, model = _load(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow and torch raise many kinds for a broken model
        result.checks["loads"] = (False, _first_line(exc))
        return result
    if not isinstance(model, PurchasePropensity):
        result.checks["loads"] = (False, f"a {type(model).__name__}, not a purchase model")
        return result
    result.checks["loads"] = (True, f"{model.model_name}, {model.features.n_dense} dense inputs")
    result.checks["inputs"] = _purchase_inputs(settings, model)
    if not result.checks["inputs"][0]:
        return result  # transforming the rows would fail on the same columns
    split = TimeSplit.of(read_training_set(data), str(data))
    valid, test = model.features.transform(split.valid), model.features.transform(split.test)
    valid_p, test_p = predict_purchase(model.model, valid), predict_purchase(model.model, test)
    served = loaded.predict(input_example(split.test.head(_FINITE_SAMPLE)))["probability"].to_numpy()
    finite = bool(np.isfinite(valid_p).all() and np.isfinite(test_p).all() and np.isfinite(served).all())
    result.checks["finite"] = (
        finite,
        f"every probability of {len(test):,} rows finite" if finite else "non-finite probabilities",
    )
    if finite:
        result.metrics = purchase_report(valid.labels, valid_p, test.labels, test_p)
    result.units = np.arange(len(test))
    result.values, result.labels = test_p.astype(np.float64), test.labels.astype(int)
    result.seconds = time.perf_counter() - started
    return result


def evaluate_version(
    settings: Settings, name: str, version: str, task: str, data: Path, seed: int
) -> Evaluation:
    """The gate's evaluation of ``models:/name/version`` on ``data`` with the task's protocol."""
    evaluate = evaluate_next_item_version if task == "next-item" else evaluate_purchase_version
    try:
        return evaluate(settings, f"models:/{name}/{version}", version, Path(data), seed)
    except ShopsightError:
        raise  # the data, not the model: the message says what to fix
    except Exception as exc:  # noqa: BLE001 - a model that loads but cannot predict fails the gate
        failed = Evaluation(version)
        failed.checks["finite"] = (False, f"predicting failed: {type(exc).__name__}: {_first_line(exc)}")
        return failed


# ------------------------------------------------------------------------------------- bootstrap


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC by the rank-sum formula (ties averaged); NaN with one class only."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def paired_bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, samples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """The observed ``statistic`` (a function of unit indices) and its 95% percentile interval.

    Returns ``mean`` (the statistic on all units), ``lo``, ``hi`` and ``units``. Resamples where the
    statistic is undefined (NaN: one class only) are skipped.
    """
    rng = np.random.default_rng(seed)
    observed = statistic(np.arange(n))
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(samples)])
    draws = draws[np.isfinite(draws)]
    lo, hi = np.percentile(draws, [2.5, 97.5]) if len(draws) else (float("nan"), float("nan"))
    return {"mean": float(observed), "lo": float(lo), "hi": float(hi), "units": float(n)}


def compare(candidate: Evaluation, champion: Evaluation, task: str, samples: int, seed: int) -> dict:
    """Candidate minus champion on the primary metric, over the units both were evaluated on."""
    if task == "next-item":
        common, ci, hi = np.intersect1d(candidate.units, champion.units, return_indices=True)
        if not len(common):
            raise ShopsightError("candidate and champion share no evaluated user; they cannot be compared")
        diff = candidate.values[ci] - champion.values[hi]
        return paired_bootstrap(lambda idx: float(diff[idx].mean()), len(common), samples, seed)
    labels, cand, champ = candidate.labels, candidate.values, champion.values
    if len(cand) != len(champ) or not np.array_equal(labels, champion.labels):
        raise ShopsightError("candidate and champion were evaluated on different rows")  # pragma: no cover
    return paired_bootstrap(
        lambda idx: auc(labels[idx], cand[idx]) - auc(labels[idx], champ[idx]), len(cand), samples, seed
    )


# ------------------------------------------------------------------------------- the frozen set


def _sha256(path: Path) -> str:
    from shopsight.training.train import dataset_identity

    return dataset_identity(path)["dataset.sha256"]


def evaluation_set(
    tags: dict[str, str], name: str, candidate, eval_data: Path | None, force: bool
) -> tuple[Path, str, bool]:
    """Where to evaluate: ``(path, sha256, freeze)``; ``freeze`` when this promotion (re)freezes it.

    ``candidate`` is the candidate's :class:`~shopsight.platform.registry.VersionInfo`.
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
    info = version_info(client, name, candidate)
    task = info.task
    if task not in TASKS:
        raise ShopsightError(
            f"version {candidate} of {name} has no known task (tag task={task!r}; expected "
            f"{' or '.join(TASKS)}): set the version tag `task`"
        )
    metric, label, _ = PRIMARY[task]
    with RegistryLock(
        client, name, "promotion", cfg.lock_ttl_s, cfg.lock_settle_s, detail=f"version {candidate}"
    ) as lock:
        champion = alias_version(client, name, CHAMPION)
        if champion == candidate:
            raise ShopsightError(f"version {candidate} of {name} is already the {CHAMPION}")
        tags = dict(registered_model(client, name).tags or {})
        path, sha, freeze = evaluation_set(tags, name, info, eval_data, force)
        result = GateResult(
            name=name, task=task, candidate=candidate, champion=champion, metric=metric,
            metric_label=label, eval_path=str(path), eval_sha256=sha, tolerance=cfg.tolerance,
            candidate_eval=Evaluation(candidate), forced=force, freeze=freeze,
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
            return result
        lock.confirm()
        now_champion = alias_version(client, name, CHAMPION)
        if now_champion != champion:
            raise ShopsightError(
                f"the {CHAMPION} of {name} changed during the evaluation (version {champion} -> "
                f"{now_champion}); run the promotion again"
            )
        _record_promotion(client, result, reason)
    return result


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
    diff = compare(cand, champ, result.task, cfg.bootstrap_samples, cfg.seed)
    result.difference = diff
    if diff["mean"] < -cfg.tolerance:
        result.reasons.append(
            f"{result.metric_label} {cand.metrics[result.metric]:.4f} is worse than the champion's "
            f"{champ.metrics[result.metric]:.4f} by {-diff['mean']:.4f} (tolerance {cfg.tolerance:g}; "
            f"difference {diff['mean']:+.4f}, 95% CI [{diff['lo']:+.4f}, {diff['hi']:+.4f}])"
        )
        return
    result.passed = True


def _record_promotion(client, result: GateResult, reason: str | None) -> None:
    name, candidate, champion = result.name, result.candidate, result.champion
    at, by = now_utc(), current_user()
    gate = "passed" if result.passed else "overridden"
    if result.passed and champion is None:
        gate = "first"
    metrics = {candidate: result.candidate_eval.metrics.get(result.metric)}
    if result.champion_eval is not None and result.metric in result.champion_eval.metrics:
        metrics[champion] = result.champion_eval.metrics[result.metric]
    client.set_registered_model_alias(name, CHAMPION, candidate)
    if result.freeze:
        for key, value in {EVAL_PATH: result.eval_path, EVAL_SHA256: result.eval_sha256,
                           "eval.frozen_at": at, "eval.frozen_by": by}.items():  # fmt: skip
            client.set_registered_model_tag(name, key, value)
    text = (reason or "").strip() or ("first champion" if gate == "first" else "gate passed")
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
    result.promoted = True
    result.entry = append_history(
        client, name,
        {"action": "promote", "at": at, "by": by, "from": champion, "to": candidate, "task": result.task,
         "metric": result.metric, "metrics": metrics, "difference": result.difference,
         "tolerance": result.tolerance, "gate": gate, "forced": result.forced, "reason": text,
         "overridden": result.reasons if result.forced and not result.passed else [],
         "eval": {"path": result.eval_path, "sha256": result.eval_sha256, "frozen": result.freeze}},
    )  # fmt: skip


def rollback(settings: Settings, name: str, reason: str | None = None) -> dict:
    """Move ``champion`` back to the champion before the current one; returns the history entry.

    The champions form a stack (promotions push, rollbacks pop: see
    :func:`~shopsight.platform.registry.champion_stack`), so repeated rollbacks walk further back.
    No gate: a rollback returns to a version that was champion before.

    Raises:
        ShopsightError: no champion, no previous one, the alias moved outside ``models promote``, or the
            previous version was deleted.
        PromotionInProgress: another promotion or rollback of ``name`` holds the lock.
    """
    cfg = settings.promotion
    client = registry_client(settings)
    registered_model(client, name)
    with RegistryLock(client, name, "rollback", cfg.lock_ttl_s, cfg.lock_settle_s) as lock:
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
        at, by = now_utc(), current_user()
        text = (reason or "").strip() or "rollback"
        client.set_registered_model_alias(name, CHAMPION, target)
        set_version_tags(
            client, name, target,
            {"promoted_at": at, "promoted_by": by, "promoted_from": champion, "promotion_action": "rollback",
             "promotion_reason": text, "forced": "false"},
        )  # fmt: skip
        set_version_tags(client, name, champion, {"rolled_back_at": at, "rolled_back_by": by,
                                                  "rollback_reason": text})  # fmt: skip
        last = next((e for e in reversed(history) if e.get("metric")), {})
        return append_history(
            client, name,
            {"action": "rollback", "at": at, "by": by, "from": champion, "to": target,
             "task": last.get("task"), "metric": last.get("metric"),
             "metrics": {v: known[v] for v in (target, champion) if v in known}, "difference": None,
             "gate": "rollback", "forced": False, "reason": text},
        )  # fmt: skip


__all__ = [
    "PRIMARY",
    "TASKS",
    "Evaluation",
    "GateResult",
    "auc",
    "compare",
    "evaluate_version",
    "evaluation_set",
    "paired_bootstrap",
    "promote",
    "resolve_candidate",
    "rollback",
]
