"""The GPU benchmark's held-out ranking uses the model's own history length, as the platform does."""

from __future__ import annotations

import numpy as np
import torch
from benchmarks.gpu_train import held_out_quality

from shopsight.training.models import build_model
from shopsight.training.next_item.data import LeaveOneOut, SequenceData
from shopsight.training.next_item.evaluate import evaluate_next_item, scorer


def _long_histories(users: int = 40, length: int = 150, items: int = 300) -> LeaveOneOut:
    rng = np.random.default_rng(0)
    user_ids = np.repeat(np.arange(users), length)
    item_ids = rng.integers(1, items + 1, size=users * length)
    return LeaveOneOut.split(SequenceData.from_pairs(user_ids, item_ids))


def test_the_test_ranks_with_the_models_max_len_not_50():
    split = _long_histories()
    torch.manual_seed(0)
    model = build_model("sasrec", n_items=split.n_items, max_len=120, d_model=16, n_heads=1, n_blocks=1)
    quality = held_out_quality(model, split, "test", "cpu")
    own = evaluate_next_item(scorer(model.eval()), split, "test", 120)
    cut = evaluate_next_item(scorer(model.eval()), split, "test", 50)
    public = [k for k in own if not k.startswith("_")]  # "_"-keys are per-user arrays
    assert public and {k: quality[k] for k in public} == {k: own[k] for k in public}
    # the history length matters here (so a cut at 50 would have been caught): full-ranking scores differ
    assert quality["ndcg@10_full"] != cut["ndcg@10_full"] or quality["ndcg@10"] != cut["ndcg@10"]
