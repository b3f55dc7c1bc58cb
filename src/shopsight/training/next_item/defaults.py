"""The next-item model's settings a user did not set, chosen from the data: one rule, in :func:`choose`.

What the data says: how long histories are (``max_len`` covers 90% of them), how big the catalogue is (the
sampled softmax's negatives grow with it) and how often each item occurs (rare items overfit: more dropout;
frequent ones support wider embeddings, when histories are also long). On games.txt (histories of 9 events
on average, 90% at most 15; 23,715 items seen 12 times each) the rule gives the best single-model recipe
measured there (benchmarks/results/next_item.md: sampled softmax, d=50, max_len 50, dropout 0.5, 256
negatives).

The loss: the sampled softmax beat the paper's BCE on games.txt (test NDCG@10 0.548 against 0.486, full
ranking HR@10 0.10 against 0.05, in a third of the epochs), so it is the default of both models. The LSTM
was measured only with the sampled softmax (NDCG@10 0.508, above BCE SASRec's 0.486).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shopsight.training.next_item.data import SequenceData

MAX_LEN_STEP, MAX_LEN_FLOOR, MAX_LEN_CAP = 50, 50, 400


@dataclass(frozen=True)
class DataStats:
    """What the rule reads of a dataset."""

    users: int
    items: int
    interactions: int
    history_p50: float  # events per user: the median
    history_p90: float  # ... and the 90th percentile

    @property
    def per_item(self) -> float:
        """Interactions per catalogue item (how much each item embedding has to learn from)."""
        return self.interactions / max(self.items, 1)

    @classmethod
    def of(cls, data: SequenceData) -> DataStats:
        lengths = np.array([len(s) for s in data.sequences])
        return cls(
            users=len(lengths),
            items=data.n_items,
            interactions=int(lengths.sum()),
            history_p50=float(np.percentile(lengths, 50)),
            history_p90=float(np.percentile(lengths, 90)),
        )


@dataclass(frozen=True)
class Choice:
    """The settings chosen (model config keys) and, for each, why."""

    values: dict[str, Any]
    reasons: dict[str, str] = field(default_factory=dict)

    def lines(self, given: dict[str, Any] | None = None) -> list[str]:
        """The console's account of the choice: the values, then the reasons (``given``: what the user
        set, which wins over the choice)."""
        given = given or {}
        shown = [f"{k} {given[k]} (given)" if k in given else f"{k} {v}" for k, v in self.values.items()]
        reasons = "; ".join(f"{k}: {r}" for k, r in self.reasons.items() if k not in given)
        return [f"settings from the data: {', '.join(shown)}", f"why: {reasons}"] if reasons else []


def choose(stats: DataStats, model: str = "sasrec") -> Choice:
    """The next-item settings for data like ``stats`` (``model``: ``sasrec`` or ``lstm``).

    - ``max_len``: the 90th percentile of history length, rounded up to a multiple of 50, between 50 and
      400 (longer inputs cost attention time quadratically and only the longest 10% would fill them).
    - ``d_model``: the model's own default (SASRec 50, LSTM 64) for short histories or sparse items; 128
      when histories reach 100+ events and items average 20+ interactions; 256 at 200+ events and 100+
      interactions per item. Wider embeddings need both: many events per user to use them, many per item
      to learn them. The LSTM's hidden state is twice ``d_model``.
    - ``dropout``: 0.5 below 20 interactions per item (sparse: the setting that won on games.txt), 0.3 up
      to 100, 0.2 above (the SASRec paper's for MovieLens-1M, about 300 per item). The LSTM's at most 0.3:
      it drops every step's input and output.
    - ``n_negatives`` (shared sampled-softmax negatives): 256 below 50,000 items, 512 below 500,000, then
      1,024: a bigger catalogue needs more negatives to find the hard ones.
    - ``loss``: ``sampled_softmax`` (see the module's docstring).
    """
    values: dict[str, Any] = {"loss": "sampled_softmax"}
    reasons = {"loss": "beat bce on games.txt (test NDCG@10 0.548 vs 0.486)"}

    p90 = stats.history_p90
    max_len = min(MAX_LEN_CAP, max(MAX_LEN_FLOOR, math.ceil(p90 / MAX_LEN_STEP) * MAX_LEN_STEP))
    values["max_len"] = max_len
    reasons["max_len"] = f"90% of histories have at most {p90:.0f} events"

    per_item = stats.per_item
    base = 64 if model == "lstm" else 50
    if max_len >= 200 and per_item >= 100:
        d_model, why = 256, "long histories, dense items"
    elif max_len >= 100 and per_item >= 20:
        d_model, why = 128, "long histories, items seen 20+ times"
    else:
        d_model, why = base, "short histories or sparse items"
    values["d_model"] = d_model
    reasons["d_model"] = f"{why} ({per_item:.1f} interactions per item)"
    if model == "lstm":
        values["hidden"] = 2 * d_model

    dropout = 0.5 if per_item < 20 else 0.3 if per_item < 100 else 0.2
    if model == "lstm":
        dropout = min(dropout, 0.3)
    values["dropout"] = dropout
    reasons["dropout"] = (
        "sparse items" if per_item < 20 else "items seen often" if per_item < 100 else "dense"
    )

    negatives = 256 if stats.items < 50_000 else 512 if stats.items < 500_000 else 1024
    values["n_negatives"] = negatives
    reasons["n_negatives"] = f"{stats.items:,} items"
    return Choice(values, reasons)


__all__ = ["Choice", "DataStats", "choose"]
