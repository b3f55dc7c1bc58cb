"""The user head both sequence models share (purchase, churn: one probability per user snapshot), in the style
of Alibaba's Behavior Sequence Transformer (Chen et al., 2019): each event of the sequence is the item's
embedding plus embeddings of its category, its behaviour (pv/cart/fav/buy) and how long before the snapshot
it happened; the sequence model's summary of it (its last position), concatenated with the user's dense
activity features, goes through an MLP to one logit of the task's label.

Inputs, all (B, T) and left-padded with 0 except ``dense`` (B, F): ``items`` (the model's item ids, 0 for an
item the vocabulary does not know), ``categories``, ``behaviors`` (1..4; 0 only on padding, so it marks the
real events), ``gaps`` (time-gap buckets 1..N_GAP_BUCKETS).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

N_BEHAVIORS = 4
N_GAP_BUCKETS = 16  # bucket b holds gaps of 2^(b-1)-1 .. 2^b-1 hours; the last one everything older


class SideEmbeddings(nn.Module):
    """What BST adds beside the item: category, behaviour and time-gap embeddings, summed (B, T, D)."""

    def __init__(self, n_categories: int, d_model: int) -> None:
        super().__init__()
        self.category = nn.Embedding(n_categories + 1, d_model, padding_idx=0)
        self.behavior = nn.Embedding(N_BEHAVIORS + 1, d_model, padding_idx=0)
        self.gap = nn.Embedding(N_GAP_BUCKETS + 1, d_model, padding_idx=0)
        for emb in (self.category, self.behavior, self.gap):
            nn.init.normal_(emb.weight, std=0.02)
            with torch.no_grad():
                emb.weight[0].zero_()

    def forward(self, categories: torch.Tensor, behaviors: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        return self.category(categories) + self.behavior(behaviors) + self.gap(gaps)  # (B, T, D)


class UserTower(nn.Module):
    """MLP over [sequence summary (B, D) ; dense features (B, F)] -> one logit per user (B,)."""

    def __init__(self, d_model: int, n_dense: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model + n_dense, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(),
            nn.Linear(hidden // 2, 1),
        )

    def forward(self, summary: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([summary, dense.to(summary.dtype)], dim=-1)).squeeze(-1)  # (B,)


class UserHead:
    """Mixin for a sequence model with ``encode(items, side, present) -> (B, T, D)`` and ``cfg.n_dense``,
    ``cfg.n_categories``, ``cfg.d_model``, ``cfg.head_hidden``, ``cfg.dropout``: adds the purchase head."""

    def build_user_head(self, cfg) -> None:
        if cfg.n_dense:
            self.side = SideEmbeddings(cfg.n_categories, cfg.d_model)
            self.tower = UserTower(cfg.d_model, cfg.n_dense, cfg.head_hidden, cfg.dropout)

    def user_logits(
        self,
        items: torch.Tensor,
        categories: torch.Tensor,
        behaviors: torch.Tensor,
        gaps: torch.Tensor,
        dense: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B,) of the label, from event sequences (B, T) and dense features (B, F)."""
        if not self.cfg.n_dense:
            raise ValueError(f"this {type(self).__name__} has no purchase head (n_dense=0)")
        side = self.side(categories, behaviors, gaps)  # (B, T, D)
        summary = self.encode(items, side, present=behaviors > 0)[:, -1]  # (B, D): has seen every event
        return self.tower(summary, dense)

    def user_loss(self, *batch: torch.Tensor) -> torch.Tensor:
        """Weighted BCE of a batch: items, categories, behaviors, gaps, dense, labels, pos_weight."""
        *inputs, labels, pos_weight = batch
        return weighted_bce(self.user_logits(*inputs), labels, pos_weight)

    def user_proba(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Probabilities (B,) of the label."""
        return torch.sigmoid(self.user_logits(*inputs).float())


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the positives' term weighted by ``pos_weight`` (1 = unweighted)."""
    return F.binary_cross_entropy_with_logits(
        logits.float(), labels.float(), pos_weight=pos_weight.float().reshape(1)
    )


def transfer_pretrained(model: nn.Module, pretrained: dict[str, torch.Tensor]) -> list[str]:
    """Copy every weight of a pretrained next-item model whose name and shape match; returns their names.

    The purchase model's item embeddings, positions and blocks have the names the next-item model gives
    them, so pretraining on next-item prediction initialises the sequence encoder; the side embeddings
    and the tower start fresh.
    """
    own = model.state_dict()
    matched = {k: v for k, v in pretrained.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return sorted(matched)
