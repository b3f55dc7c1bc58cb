"""The next-item protocol of architecture.md: leave-one-out, HR@10 and NDCG@10 with 100 sampled
negatives (the SASRec paper's protocol) and with full ranking over all items."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from shopsight.training.metrics import hit_rate, ndcg, rank_of_target
from shopsight.training.sequences import LeaveOneOut


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
