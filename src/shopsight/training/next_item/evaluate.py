"""The next-item protocol of docs/architecture.md: leave-one-out, HR@10 and NDCG@10 with 100 sampled
negatives (the SASRec paper's protocol) and with full ranking over all items."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shopsight.platform import Settings, ShopsightError
from shopsight.training.next_item.data import LeaveOneOut, SequenceData
from shopsight.training.next_item.pyfunc import ITEMS
from shopsight.training.runtime.metrics import hit_rate, ndcg, rank_of_target
from shopsight.training.runtime.tracking import model_dir, public


def sample_negatives(split: LeaveOneOut, users: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(U, n) items drawn uniformly from those each user never interacted with."""
    out = np.empty((len(users), n), dtype=np.int64)
    for row, u in enumerate(users):
        interacted = set(split.train[u].tolist()) | {int(split.valid_target[u]), int(split.test_target[u])}
        chosen: list[int] = []
        while len(chosen) < n:
            draw = rng.integers(1, split.n_items + 1, size=2 * n)
            chosen += [int(i) for i in draw if int(i) not in interacted]
        out[row] = chosen[:n]
    return out


def scorer(model: nn.Module) -> Callable:
    """``score(seqs, candidates)`` for evaluation: candidate scores, or every item's with None."""

    def score(seqs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        return model.predict(seqs) if candidates is None else model.score(seqs, candidates)

    return score


@torch.no_grad()
def evaluate_next_item(
    score: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    split: LeaveOneOut,
    stage: str = "test",
    max_len: int = 50,
    k: int = 10,
    n_negatives: int = 100,
    seed: int = 0,
    batch_size: int = 512,
    max_users: int | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """HR@k and NDCG@k, sampled (``n_negatives``) and full ranking, on ``stage`` ("valid" or "test").

    Args:
        score: ``score(seqs, candidates)`` -> (B, C) scores; with ``candidates=None`` -> (B, n_items + 1)
            scores of every item (column 0, padding, ignored).
        max_users: evaluate a seeded random subset of users (the SASRec code uses 10,000 for speed).
    """
    rng = np.random.default_rng(seed)
    users, seqs, targets = split.inputs(stage, max_len)
    if max_users is not None and len(users) > max_users:
        keep = np.sort(rng.choice(len(users), max_users, replace=False))
        users, seqs, targets = users[keep], seqs[keep], targets[keep]
    negatives = sample_negatives(split, users, n_negatives, rng)
    sampled_ranks, full_ranks, lengths = [], [], []
    for start in range(0, len(users), batch_size):
        sl = slice(start, start + batch_size)
        batch = torch.as_tensor(seqs[sl], device=device)
        candidates = np.concatenate([targets[sl, None], negatives[sl]], axis=1)
        sampled = score(batch, torch.as_tensor(candidates, device=device)).float().cpu().numpy()
        sampled_ranks.append(rank_of_target(sampled, 0))
        full = score(batch, None).float().cpu().numpy()
        full[:, 0] = -np.inf
        for row, u in enumerate(users[sl]):
            full[row, split.seen(int(u), stage)] = -np.inf
        full_ranks.append(rank_of_target(full, targets[sl]))
        lengths.append((seqs[sl] > 0).sum(axis=1))
    sampled_ranks = np.concatenate(sampled_ranks)
    full_ranks = np.concatenate(full_ranks)
    return {
        "users": float(len(users)),
        f"hr@{k}": hit_rate(sampled_ranks, k),
        f"ndcg@{k}": ndcg(sampled_ranks, k),
        f"hr@{k}_full": hit_rate(full_ranks, k),
        f"ndcg@{k}_full": ndcg(full_ranks, k),
        "_ranks_sampled": sampled_ranks,  # for plots by sequence length
        "_ranks_full": full_ranks,
        "_lengths": np.concatenate(lengths),
    }


class Popularity:
    """The popularity baseline: every user gets the items most frequent in the training histories."""

    def __init__(self, split: LeaveOneOut) -> None:
        counts = np.bincount(np.concatenate(split.train), minlength=split.n_items + 1).astype(np.float32)
        counts[0] = -np.inf
        self.scores = torch.as_tensor(counts)

    def __call__(self, seqs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        if candidates is None:
            return self.scores.expand(len(seqs), -1).clone()
        return self.scores[candidates]


def load_recommender(settings: Settings, model_uri: str):
    """The registered pyfunc's network and item mapping, loaded from MLflow."""
    from shopsight.training.next_item.pyfunc import NextItemRecommender

    folder = model_dir(settings, model_uri)
    if not (folder / ITEMS).exists():
        raise ShopsightError(f"{model_uri} is not a next-item model")
    return NextItemRecommender.from_folder(folder)


def in_model_items(data: SequenceData, index: dict[int, int], item_ids: np.ndarray) -> SequenceData:
    """``data``'s histories in a model's item space: interactions with items it never saw are dropped."""
    sequences = [
        np.array([index[int(i)] for i in data.item_ids[seq] if int(i) in index], dtype=np.int64)
        for seq in data.sequences
    ]
    return SequenceData(sequences, data.user_ids, item_ids)


def evaluate_model_uri(
    settings: Settings, model_uri: str, data: Path, max_users: int | None = None, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Test metrics of the model and of the popularity baseline on ``data`` (in the model's item space).

    Items the model never saw cannot be scored: interactions with them are dropped from the histories
    (and users left with fewer than 3 interactions are not evaluated).
    """
    recommender = load_recommender(settings, model_uri)
    split = LeaveOneOut.split(
        in_model_items(SequenceData.from_file(data), recommender.index, recommender.item_ids)
    )
    if not (split.test_target > 0).any():
        raise ShopsightError(f"{data}: no user has 3 or more interactions with items the model knows")
    max_len = recommender.max_len
    model = evaluate_next_item(
        scorer(recommender.model), split, "test", max_len, max_users=max_users, seed=seed
    )
    popular = evaluate_next_item(Popularity(split), split, "test", max_len, max_users=max_users, seed=seed)
    return {model_uri: public(model), "popularity (same data)": public(popular)}


# a next-item pyfunc input column -> the feature serving fills it from (the ranking predictor's read)
SERVED_INPUTS = {"item_ids": "seq_item_ids"}


class _FiniteScorer:
    """The protocol's scorer, noting whether any real item ever got a non-finite score."""

    def __init__(self, score) -> None:
        self.score, self.finite = score, True

    def __call__(self, seqs, candidates):
        out = self.score(seqs, candidates)
        values = out if candidates is not None else out[:, 1:]  # column 0 is padding
        if self.finite and not bool(values.float().isfinite().all()):
            self.finite = False
        return out


def evaluate_version(settings: Settings, task, model_uri: str, version: str, data: Path, seed: int):
    """The gate's checks and the leave-one-out test of a registered next-item model on ``data``.

    Interactions with items the model never saw are dropped from the histories (as ``shopsight
    evaluate`` does); the per-user NDCG@10 gains are keyed by the shop's user ids for pairing.
    """
    import time

    import pandas as pd

    from shopsight.training.next_item.pyfunc import NextItemRecommender
    from shopsight.training.runtime.versions import FINITE_SAMPLE, Evaluation, load_version, service_fields

    started = time.perf_counter()
    result = Evaluation(version)
    loaded, model, loads = load_version(model_uri, NextItemRecommender)
    if model is None:
        result.checks["loads"] = loads
        return result
    result.checks["loads"] = (True, f"{model.model_name}, {len(model.item_ids) - 1:,} items")
    result.checks["inputs"] = _served_inputs(loaded, service_fields(settings, task.route.service), task)
    known = in_model_items(SequenceData.from_file(data), model.index, model.item_ids)
    split = LeaveOneOut.split(known)
    users, _, _ = split.inputs("test", model.max_len)
    if not len(users):
        raise ShopsightError(f"{data}: no user has 3 or more interactions with items version {version} knows")
    score = _FiniteScorer(scorer(model.model))
    metrics = evaluate_next_item(score, split, "test", model.max_len, seed=seed)
    ranks = metrics["_ranks_sampled"]
    # the served path too: the pyfunc on a sample of the test histories, in the shop's item ids
    sample = users[:FINITE_SAMPLE]
    histories = [model.item_ids[np.append(split.train[u], split.valid_target[u])].tolist() for u in sample]
    served = loaded.predict(pd.DataFrame({"item_ids": histories}), params={"k": 10})
    served_finite = all(np.isfinite(np.asarray(s, dtype=np.float64)).all() for s in served["scores"])
    finite = score.finite and served_finite
    result.checks["finite"] = (
        finite,
        f"every score of {len(users):,} users finite" if finite else "non-finite scores (NaN or inf)",
    )
    result.metrics = public(metrics)
    result.units = known.user_ids[users]
    result.values = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
    result.seconds = time.perf_counter() - started
    return result


def _served_inputs(loaded, fields: set[str], task) -> tuple[bool, str]:
    signature = loaded.metadata.signature
    if signature is None or signature.inputs is None:
        return False, "the model has no input signature"
    names = list(signature.inputs.input_names())
    service = task.route.service
    unknown = [n for n in names if n not in SERVED_INPUTS or SERVED_INPUTS[n] not in fields]
    if unknown:
        return False, f"input(s) {', '.join(map(str, unknown))} are not served by {service}"
    return True, ", ".join(f"{n} <- {service}.{SERVED_INPUTS[n]}" for n in names)


def paired_difference(candidate, champion):
    """Candidate minus champion: the mean per-user NDCG@10 gain over the users both were evaluated on,
    as a statistic of resampled unit indices, and the number of units."""
    common, ci, hi = np.intersect1d(candidate.units, champion.units, return_indices=True)
    if not len(common):
        raise ShopsightError("candidate and champion share no evaluated user; they cannot be compared")
    diff = candidate.values[ci] - champion.values[hi]
    return (lambda idx: float(diff[idx].mean())), len(common)
