"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

A causal Transformer over the user's item sequence: item embeddings (scaled by sqrt(d)) plus learned
positions, ``blocks`` self-attention blocks that only look backwards, and the next item scored by the dot
product of the last hidden state with the item's embedding (shared input/output embeddings).

Losses (:mod:`._next_item_loss`): the paper's binary cross-entropy with one sampled negative per position
(``"bce"``), a sampled softmax whose negatives are shared across the batch (``"sampled_softmax"``), and
cross-entropy over the whole catalogue (``"softmax"``).
``pre_ln`` puts LayerNorm before attention and feed-forward (the variant that trains more stably).

With ``n_dense > 0`` the model also has the purchase head of :mod:`._user_head` (Behavior Sequence
Transformer style): ``user_loss`` / ``user_proba`` over items, categories, behaviours, time gaps
and the user's dense activity features. The encoder is the same, so a next-item model pretrained on all
behaviour initialises it (:func:`transfer_pretrained`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from shopsight.training.models._next_item_loss import NextItemOutput, check_loss
from shopsight.training.models._user_head import UserHead


@dataclass(frozen=True)
class SASRecConfig:
    """Hyperparameters of SASRec. ``n_items`` counts real items; id 0 is padding."""

    n_items: int
    max_len: int = 50
    d_model: int = 50
    n_heads: int = 1
    n_blocks: int = 2
    dropout: float = 0.5
    pre_ln: bool = True
    loss: Literal["bce", "sampled_softmax", "softmax", "gbce"] = "bce"
    n_negatives: int = 256  # shared negatives of the sampled softmax
    gbce_t: float = 0.75  # gBCE's calibration: 0 = plain BCE, 1 = the full correction (beta = alpha)
    n_dense: int = 0  # dense features of the purchase head; 0: next-item only
    n_categories: int = 0  # category vocabulary of the purchase head's side embeddings
    head_hidden: int = 128

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.max_len < 1:
            raise ValueError("n_items and max_len must be positive")
        if self.n_dense < 0 or self.n_categories < 0:
            raise ValueError("n_dense and n_categories must not be negative")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        check_loss(self.loss)


class _Block(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=1e-8)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_model),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, causal: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D); causal: (T, T) True = masked; keep: (B, T, 1) 1 on real items
        if self.pre_ln:
            q = self.attn_norm(x)
            x = x + self.attn(q, q, q, attn_mask=causal, need_weights=False)[0]
            x = x + self.ffn(self.ffn_norm(x))
        else:  # the paper's order: normalise after each residual
            x = self.attn_norm(x + self.attn(x, x, x, attn_mask=causal, need_weights=False)[0])
            x = self.ffn_norm(x + self.ffn(x))
        return x * keep


class SASRec(NextItemOutput, UserHead, nn.Module):
    """Next-item model over item-id sequences (left-padded with 0)."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_blocks))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=1e-8)
        causal = torch.triu(torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)
        self._init()
        self.build_user_head(cfg)

    def _init(self) -> None:
        for name, param in self.named_parameters():
            if param.dim() > 1 and "norm" not in name:
                nn.init.xavier_normal_(param)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(
        self, seq: torch.Tensor, side: torch.Tensor | None = None, present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states (B, T, D) of item sequences (B, T), T <= max_len.

        ``side`` (B, T, D) is added to the item embeddings (the purchase head's event attributes);
        ``present`` (B, T) marks real events where item id 0 may also be an unknown item.
        """
        t = seq.shape[1]
        x = self.item_emb(seq) * self.cfg.d_model**0.5  # (B, T, D)
        x = x + self.pos_emb(torch.arange(t, device=seq.device))[None]
        if side is not None:
            x = x + side
        keep = ((seq > 0) if present is None else present).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        x = self.emb_dropout(x) * keep
        causal = self.causal[:t, :t]
        for block in self.blocks:
            x = block(x, causal, keep)
        return self.final_norm(x)
