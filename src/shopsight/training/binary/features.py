"""How a binary model of user snapshots (purchase, churn) turns feature rows into network inputs, and its
probabilities: what the registered model applies at predict time.

:class:`SnapshotFeatures` is fitted on the training rows only (scaling, vocabularies) and saved with the
model, so serving transforms a live feature row exactly as training did. Dense features: every numeric
activity feature as ``log1p`` (counts and hours are heavy-tailed) then standardised; ``hours_since_*``
that are null (never did it) become "two weeks" plus an indicator; the segment one-hot.

A registered model carries this module among its own code (MLflow ``code``), so it imports numpy, pandas,
torch and the networks only. What needs the platform (the label table, the event schema) is imported where
training and evaluation use it: fitting, and transforming labelled rows (:mod:`.data`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from shopsight.training._errors import user_error
from shopsight.training.models import N_GAP_BUCKETS

SNAPSHOT = "event_timestamp"  # the snapshot instant of each training-set row
SEQUENCE_COLUMNS = ("seq_item_ids", "seq_category_ids", "seq_behaviors", "seq_ts")
REQUIRED = ("user_id", SNAPSHOT, *SEQUENCE_COLUMNS, "segment_id")
NEVER_HOURS = 24.0 * 14


def check_rows(frame: pd.DataFrame, source: str) -> None:
    """An error naming what is missing when ``frame`` is no set of user-snapshot feature rows."""
    if frame.empty:
        raise user_error(f"{source}: the dataset is empty (no rows)")
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise user_error(
            f"{source}: missing column(s) {', '.join(missing)}; expected a training set of a feature "
            "service of user snapshots (`shopsight features training-set`)"
        )


@dataclass
class SnapshotTensors:
    """Model inputs of N rows: sequences (N, T) left-padded, dense (N, F), labels (N,)."""

    items: np.ndarray
    categories: np.ndarray
    behaviors: np.ndarray
    gaps: np.ndarray
    dense: np.ndarray
    labels: np.ndarray
    user_ids: np.ndarray
    days: np.ndarray  # the snapshot day of each row (datetime64[D])

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, ...]:
        return (
            self.items[rows],
            self.categories[rows],
            self.behaviors[rows],
            self.gaps[rows],
            self.dense[rows],
        )


@dataclass
class SnapshotFeatures:
    """How training-set rows become tensors; fitted on training rows, saved beside the model."""

    dense_columns: list[str]
    means: list[float]
    stds: list[float]
    n_segments: int
    item_ids: list[int]  # sorted vocabulary: item_ids[k] is model item k+1
    category_ids: list[int]
    max_len: int = 50
    never_columns: list[str] = field(default_factory=list)  # hours_since_* with a "never" indicator
    # the behaviour vocabulary: behaviors[k] is model behaviour k+1 (saved with the model, so that it
    # predicts without the platform's event schema; empty in models saved before it was)
    behaviors: list[str] = field(default_factory=list)

    @property
    def n_dense(self) -> int:
        return len(self.dense_columns) + len(self.never_columns) + self.n_segments

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_categories(self) -> int:
        return len(self.category_ids)

    @classmethod
    def fit(
        cls, frame: pd.DataFrame, item_ids: np.ndarray | None = None, max_len: int = 50
    ) -> SnapshotFeatures:
        """Fit on training rows. ``item_ids``: a pretrained next-item model's vocabulary to share
        (its ``item_ids[1:]``); by default the items of these rows."""
        from shopsight.data.schema import BEHAVIORS
        from shopsight.training.binary.data import NOT_DENSE, check_columns

        check_columns(frame, "training rows")
        columns = [c for c in frame.columns if c not in NOT_DENSE and pd.api.types.is_numeric_dtype(frame[c])]
        never = [c for c in columns if c.startswith("hours_since_")]
        raw = _dense_raw(frame, columns)
        means, stds = raw.mean(axis=0), raw.std(axis=0)
        if item_ids is None:
            item_ids = np.unique(np.concatenate([np.asarray(s, np.int64) for s in frame["seq_item_ids"]]))
        categories = np.unique(np.concatenate([np.asarray(s, np.int64) for s in frame["seq_category_ids"]]))
        return cls(
            dense_columns=columns,
            means=means.tolist(),
            stds=np.where(stds > 1e-9, stds, 1.0).tolist(),
            n_segments=int(frame["segment_id"].max()) + 1,
            item_ids=[int(i) for i in np.sort(item_ids)],
            category_ids=[int(c) for c in categories],
            max_len=max_len,
            never_columns=never,
            behaviors=list(BEHAVIORS),
        )

    def transform(self, frame: pd.DataFrame, need_label: bool = True) -> SnapshotTensors:
        """Tensors of ``frame``'s rows (labels are zeros where ``need_label`` is False)."""
        check_rows(frame, "purchase rows")
        label = None
        if need_label:
            from shopsight.training.binary.data import label_of  # training and evaluation only

            label = label_of(frame, "purchase rows")
        missing = [c for c in self.dense_columns if c not in frame.columns]
        if missing:
            raise user_error(f"purchase rows lack feature column(s) {', '.join(missing)}")
        n, t = len(frame), self.max_len
        dense = (_dense_raw(frame, self.dense_columns) - np.array(self.means)) / np.array(self.stds)
        never = frame[self.never_columns].isna().to_numpy(np.float32)
        segments = np.zeros((n, self.n_segments), np.float32)
        seg = frame["segment_id"].fillna(-1).to_numpy(np.int64)
        ok = (seg >= 0) & (seg < self.n_segments)
        segments[np.flatnonzero(ok), seg[ok]] = 1.0
        items, categories, behaviors, gaps = (np.zeros((n, t), np.int64) for _ in range(4))
        # unit-safe: pandas keeps us or ns from the source, and MLflow's schema turns us into ns
        snapshot = (pd.to_datetime(frame[SNAPSHOT], utc=True).dt.as_unit("s").astype("int64")).to_numpy()
        item_vocab, category_vocab = np.asarray(self.item_ids), np.asarray(self.category_ids)
        behavior_index = self._behavior_index()
        for row, (its, cats, behs, ts) in enumerate(zip(*(frame[c] for c in SEQUENCE_COLUMNS), strict=True)):
            if its is None or len(its) == 0:
                continue
            its, cats, ts = (np.asarray(a, np.int64)[-t:] for a in (its, cats, ts))
            behs = list(behs)[-t:]
            k = len(its)
            items[row, t - k :] = _lookup(item_vocab, its)
            categories[row, t - k :] = _lookup(category_vocab, cats)
            behaviors[row, t - k :] = [behavior_index.get(b, 1) for b in behs]
            hours = np.maximum(snapshot[row] - ts, 0) / 3600.0
            gaps[row, t - k :] = 1 + np.minimum(np.log2(1 + hours).astype(np.int64), N_GAP_BUCKETS - 1)
        labels = frame[label].to_numpy(np.float32) if label is not None else np.zeros(n, np.float32)
        return SnapshotTensors(
            items=items,
            categories=categories,
            behaviors=behaviors,
            gaps=gaps,
            dense=np.concatenate([dense.astype(np.float32), never, segments], axis=1),
            labels=labels,
            user_ids=frame["user_id"].to_numpy(np.int64),
            days=pd.to_datetime(frame[SNAPSHOT], utc=True).dt.tz_localize(None).to_numpy("datetime64[D]"),
        )

    def _behavior_index(self) -> dict[str, int]:
        vocabulary = self.behaviors
        if not vocabulary:  # saved before the vocabulary was: the platform's event schema, as it trained
            from shopsight.data.schema import BEHAVIORS

            vocabulary = list(BEHAVIORS)
        return {b: k + 1 for k, b in enumerate(vocabulary)}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.__dict__))

    @classmethod
    def load(cls, path: Path) -> SnapshotFeatures:
        return cls(**json.loads(Path(path).read_text()))


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, data: SnapshotTensors, device: str | torch.device = "cpu", batch_size: int = 2048
) -> np.ndarray:
    """Probabilities (N,) of the task's label for every row of ``data``."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        tensors = [torch.as_tensor(a, device=device) for a in data.inputs(rows)]
        out.append(model.user_proba(*tensors).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _dense_raw(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    values = frame[columns].astype("float64")
    hours = [c for c in columns if c.startswith("hours_since_")]
    values[hours] = values[hours].fillna(NEVER_HOURS)
    return np.log1p(np.clip(values.fillna(0.0).to_numpy(), 0.0, None))


def _lookup(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Model ids (1..len(vocab)) of ``ids`` in the sorted ``vocab``; 0 where unknown."""
    if len(vocab) == 0:
        return np.zeros(len(ids), np.int64)
    pos = np.clip(np.searchsorted(vocab, ids), 0, len(vocab) - 1)
    return np.where(vocab[pos] == ids, pos + 1, 0)


__all__ = [
    "REQUIRED",
    "SEQUENCE_COLUMNS",
    "SNAPSHOT",
    "SnapshotFeatures",
    "SnapshotTensors",
    "check_rows",
    "predict_probabilities",
]
