"""An embedding + LSTM + dense next-item model: the recurrent baseline beside SASRec.

Same contract as SASRec (``loss``, ``score``, ``predict`` over left-padded item-id sequences) and the
same output embedding trick: the next item's score is the dot product of the projected LSTM state
with the item's embedding. With ``n_dense > 0`` it has the same purchase head as SASRec
(:mod:`._user_head`), over the LSTM's last state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from shopsight.training.models._next_item_loss import NextItemOutput, check_loss
from shopsight.training.models._user_head import UserHead


@dataclass(frozen=True)
class LSTMConfig:
    """Hyperparameters of the LSTM model. ``n_items`` counts real items; id 0 is padding."""

    n_items: int
    max_len: int = 50
    d_model: int = 64
    hidden: int = 128
    n_layers: int = 1
    dropout: float = 0.3
    loss: Literal["bce", "sampled_softmax", "softmax", "gbce"] = "bce"
    n_negatives: int = 256
    gbce_t: float = 0.75  # gBCE's calibration: 0 = plain BCE, 1 = the full correction (beta = alpha)
    n_dense: int = 0  # dense features of the purchase head; 0: next-item only
    n_categories: int = 0  # category vocabulary of the purchase head's side embeddings
    head_hidden: int = 128

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.max_len < 1:
            raise ValueError("n_items and max_len must be positive")
        if self.n_dense < 0 or self.n_categories < 0:
            raise ValueError("n_dense and n_categories must not be negative")
        check_loss(self.loss)


class LSTMRec(NextItemOutput, UserHead, nn.Module):
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
        self.build_user_head(cfg)

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
