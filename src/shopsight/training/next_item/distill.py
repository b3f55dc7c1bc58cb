"""Knowledge distillation for next-item models: a student learns from the true next item and from the
mean logits of teacher models over the same candidates (Hinton et al. 2015; "born-again" networks,
Furlanello et al. 2018, when the student has the teachers' architecture).

Why: several SASRecs averaged rank better than any one of them (benchmarks/results/next_item.md), but
serving several costs several times the compute. A student of the same size trained on their averaged
scores keeps much of that gain in one model.

The teachers score the student's own training inputs in eval mode (no dropout), so their hidden states
per training position never change: they are computed once, stored concatenated across teachers, and a
candidate's mean teacher logit is one dot product with the concatenated (and 1/K-scaled) item tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shopsight.training.next_item.data import LeaveOneOut, training_inputs


@dataclass
class TeacherBatch:
    """The teachers' view of one training batch: hidden states at its real positions, in the order of
    ``h[pos > 0]`` (row by row, oldest first), and the items' concatenated embeddings."""

    hidden: torch.Tensor  # (N, K * D)
    item_table: torch.Tensor  # (n_items + 1, K * D), divided by K: dot products give the mean logit
    weight: float  # share of the distillation term in the loss

    def logits(self, targets: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
        """Mean teacher logits: (N, 1 + S) for the targets then shared ``negatives`` (S,), or with
        ``negatives=None`` (N, n_items + 1) over every item."""
        if negatives is None:
            return self.hidden @ self.item_table.T
        positive = (self.hidden * self.item_table[targets]).sum(-1, keepdim=True)
        return torch.cat([positive, self.hidden @ self.item_table[negatives].T], dim=1)


class Teacher:
    """Trained next-item models (with ``encode`` and ``item_emb``) that a student of ``max_len`` learns from.

    Args:
        models: the teachers, trained on the same item catalogue as the student.
        split: the student's training histories; their hidden states are computed once here.
        weight: the distillation term's share of the loss (the rest is the usual loss on the true item).
    """

    def __init__(
        self, models: Sequence[nn.Module], split: LeaveOneOut, max_len: int, weight: float = 0.5
    ) -> None:
        if not models:
            raise ValueError("distillation needs at least one teacher")
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"the distillation weight must be in (0, 1], not {weight}")
        for number, model in enumerate(models, 1):
            n_items = model.item_emb.num_embeddings - 1
            if n_items != split.n_items:
                raise ValueError(
                    f"teacher {number} scores {n_items} items, the training data has {split.n_items}: "
                    "teachers must be trained on the same item catalogue"
                )
            if model.cfg.max_len < max_len:
                raise ValueError(f"teacher {number} reads {model.cfg.max_len} items, the student {max_len}")
        self.weight = weight
        inputs = training_inputs(split.train, max_len)  # (U, T) the batches' exact inputs
        real = inputs > 0
        # row offsets of each user's real positions in the stored states
        self._start = np.concatenate([[0], np.cumsum(real.sum(axis=1))])
        states = []
        with torch.no_grad():
            for model in models:
                model.eval()
                device = next(model.parameters()).device
                per_model = []
                for lo in range(0, len(inputs), 1024):
                    seq = torch.as_tensor(inputs[lo : lo + 1024], device=device)
                    per_model.append(model.encode(seq)[seq > 0].float().cpu())
                states.append(torch.cat(per_model))
            # kept in host memory; a batch's rows go to the training device
            self._hidden = torch.cat(states, dim=1)  # (real positions, K * D)
            self._items = torch.cat([m.item_emb.weight.float().cpu() for m in models], dim=1) / len(models)
        self._items_on: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return self._hidden.numel() * self._hidden.element_size()

    def batch(self, users: np.ndarray, device: torch.device | str = "cpu") -> TeacherBatch:
        """The teachers' states for these users' training inputs (the rows ``training_batches`` made)."""
        users = np.asarray(users)
        first, lengths = self._start[users], self._start[users + 1] - self._start[users]
        # each user's rows first..first+length-1, concatenated in batch order
        rows = np.repeat(first - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        key = str(device)
        if key not in self._items_on:
            self._items_on[key] = self._items.to(device)
        return TeacherBatch(self._hidden[torch.as_tensor(rows)].to(device), self._items_on[key], self.weight)


def load_teachers(entries: Sequence[dict]) -> list[nn.Module]:
    """Teacher networks from ``{"model": name, "config": {...}, "state": state_dict}`` entries."""
    from shopsight.training.models import build_model

    teachers = []
    for entry in entries:
        model = build_model(entry["model"], **entry["config"])
        model.load_state_dict(entry["state"])
        teachers.append(model.eval())
    return teachers
