"""An embedding + LSTM + dense next-item model: the recurrent baseline beside SASRec.

Same contract as SASRec (``loss``, ``score``, ``predict`` over left-padded item-id sequences) and the
same output embedding trick: the next item's score is the dot product of the projected LSTM state
with the item's embedding. With ``n_dense > 0`` it has the same purchase head as SASRec
(:mod:`._purchase_head`), over the LSTM's last state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from shopsight.training.models._purchase_head import PurchaseHead


@dataclass(frozen=True)
class LSTMConfig:
    """Hyperparameters of the LSTM model. ``n_items`` counts real items; id 0 is padding."""

    n_items: int
    max_len: int = 50
    d_model: int = 64
    hidden: int = 128
    n_layers: int = 1
    dropout: float = 0.3
    loss: Literal["bce", "sampled_softmax"] = "bce"
    n_negatives: int = 256
    n_dense: int = 0  # dense features of the purchase head; 0: next-item only
    n_categories: int = 0  # category vocabulary of the purchase head's side embeddings
    head_hidden: int = 128

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.max_len < 1:
            raise ValueError("n_items and max_len must be positive")
        if self.n_dense < 0 or self.n_categories < 0:
            raise ValueError("n_dense and n_categories must not be negative")
        if self.loss not in ("bce", "sampled_softmax"):
            raise ValueError(f"unknown loss {self.loss!r}: bce or sampled_softmax")


class LSTMRec(PurchaseHead, nn.Module):
    """Next-item model over item-id sequences (left-padded with 0)."""

    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d_model, padding_idx=0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(
            cfg.d_model,
            cfg.hidden,
            num_layers=cfg.n_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0,
        )
        self.project = nn.Sequential(nn.Linear(cfg.hidden, cfg.d_model), nn.Tanh())
        nn.init.xavier_normal_(self.item_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.build_purchase_head(cfg)

    def encode(
        self, seq: torch.Tensor, side: torch.Tensor | None = None, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states (B, T, D) of sequences (B, T); left padding keeps the last step the newest.

        ``side`` (B, T, D) is added to the item embeddings (the purchase head's event attributes);
        ``present`` is accepted for the shared contract: the LSTM reads padding as zeros either way.
        """
        x = self.item_emb(seq)  # (B, T, D)
        if side is not None:
            x = x + side
        x = self.dropout(x)
        out, _ = self.lstm(x)  # (B, T, H)
        return self.project(self.dropout(out))  # (B, T, D)

    def loss(self, seq: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encode(seq)
        mask = pos > 0
        if self.cfg.loss == "bce":
            if neg is None:
                raise ValueError("the bce loss needs one negative per position")
            pos_logit = (h * self.item_emb(pos)).sum(-1)[mask]
            neg_logit = (h * self.item_emb(neg)).sum(-1)[mask]
            return F.binary_cross_entropy_with_logits(
                pos_logit, torch.ones_like(pos_logit)
            ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
        negatives = torch.randint(1, self.cfg.n_items + 1, (self.cfg.n_negatives,), device=seq.device)
        hidden = h[mask]  # (N, D)
        pos_logit = (hidden * self.item_emb(pos[mask])).sum(-1, keepdim=True)
        neg_logit = (hidden @ self.item_emb(negatives).T).masked_fill(
            negatives[None, :] == pos[mask][:, None], float("-inf")
        )
        logits = torch.cat([pos_logit, neg_logit], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=seq.device))

    def score(self, seq: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        last = self.encode(seq)[:, -1]  # (B, D)
        return (self.item_emb(candidates) * last[:, None]).sum(-1)

    def predict(self, seq: torch.Tensor) -> torch.Tensor:
        last = self.encode(seq)[:, -1]
        scores = last @ self.item_emb.weight.T  # (B, n_items + 1)
        scores[:, 0] = float("-inf")
        return scores

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.predict(seq)
