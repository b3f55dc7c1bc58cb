"""Data of the binary tasks on user snapshots (purchase, churn): a point-in-time training set of the
task's feature service (one row per user and snapshot day: the label, the activity features, the event
sequence, the segment) turned into model inputs, and the time split of docs/architecture.md. A training set
holds exactly one label column, which says its task (:func:`label_of`).

:class:`SnapshotFeatures` is fitted on the training rows only (scaling, vocabularies) and saved with the
model, so serving transforms a live feature row exactly as training did. Dense features: every numeric
activity feature as ``log1p`` (counts and hours are heavy-tailed) then standardised; ``hours_since_*``
that are null (never did it) become "two weeks" plus an indicator; the segment one-hot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from shopsight.data.schema import BEHAVIORS
from shopsight.platform import ShopsightError
from shopsight.training.models import N_GAP_BUCKETS
from shopsight.training.tasks import TASKS

# every label a training set may carry: the binary tasks' (one per training set)
LABELS = tuple(sorted({t.data.label for t in TASKS.values() if t.data.label}))
# how far each label looks past its snapshot (the furthest any task that uses it declares)
HORIZON_DAYS = {
    label: max(t.data.horizon_days for t in TASKS.values() if t.data.label == label) for label in LABELS
}
SNAPSHOT = "event_timestamp"  # the snapshot instant of each training-set row
SEQUENCE_COLUMNS = ("seq_item_ids", "seq_category_ids", "seq_behaviors", "seq_ts")
REQUIRED = ("user_id", SNAPSHOT, *SEQUENCE_COLUMNS, "segment_id")
# not dense features: ids, the label, arrays, and the segment (one-hot apart)
_NOT_DENSE = {"user_id", SNAPSHOT, *LABELS, "segment_id", "top_categories", *SEQUENCE_COLUMNS}
_NEVER_HOURS = 24.0 * 14
_BEHAVIOR_INDEX = {b: k + 1 for k, b in enumerate(BEHAVIORS)}


def label_of(frame: pd.DataFrame | list[str], source: str = "training set") -> str:
    """The one label column of a training set (ShopsightError naming the labels if none or several)."""
    columns = list(frame.columns) if isinstance(frame, pd.DataFrame) else list(frame)
    found = [label for label in LABELS if label in columns]
    if len(found) != 1:
        raise ShopsightError(
            f"{source}: {'no label column' if not found else 'several label columns: ' + ', '.join(found)}; "
            f"a training set holds one of {', '.join(LABELS)} (`shopsight features training-set`)"
        )
    return found[0]


def check_columns(frame: pd.DataFrame, source: str, need_label: bool = True) -> None:
    """ShopsightError naming what is missing when ``frame`` is no training set of user snapshots."""
    if frame.empty:
        raise ShopsightError(f"{source}: the dataset is empty (no rows)")
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ShopsightError(
            f"{source}: missing column(s) {', '.join(missing)}; expected a training set of a feature "
            "service of user snapshots (`shopsight features training-set`)"
        )
    if need_label:
        label_of(frame, source)


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
        check_columns(frame, "training rows")
        columns = [
            c for c in frame.columns if c not in _NOT_DENSE and pd.api.types.is_numeric_dtype(frame[c])
        ]
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
        )

    def transform(self, frame: pd.DataFrame, need_label: bool = True) -> SnapshotTensors:
        """Tensors of ``frame``'s rows (labels are zeros where ``need_label`` is False)."""
        check_columns(frame, "purchase rows", need_label)
        missing = [c for c in self.dense_columns if c not in frame.columns]
        if missing:
            raise ShopsightError(f"purchase rows lack feature column(s) {', '.join(missing)}")
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
        for row, (its, cats, behs, ts) in enumerate(zip(*(frame[c] for c in SEQUENCE_COLUMNS), strict=True)):
            if its is None or len(its) == 0:
                continue
            its, cats, ts = (np.asarray(a, np.int64)[-t:] for a in (its, cats, ts))
            behs = list(behs)[-t:]
            k = len(its)
            items[row, t - k :] = _lookup(item_vocab, its)
            categories[row, t - k :] = _lookup(category_vocab, cats)
            behaviors[row, t - k :] = [_BEHAVIOR_INDEX.get(b, 1) for b in behs]
            hours = np.maximum(snapshot[row] - ts, 0) / 3600.0
            gaps[row, t - k :] = 1 + np.minimum(np.log2(1 + hours).astype(np.int64), N_GAP_BUCKETS - 1)
        labels = frame[label_of(frame)].to_numpy(np.float32) if need_label else np.zeros(n, np.float32)
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

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.__dict__))

    @classmethod
    def load(cls, path: Path) -> SnapshotFeatures:
        return cls(**json.loads(Path(path).read_text()))


def _dense_raw(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    values = frame[columns].astype("float64")
    hours = [c for c in columns if c.startswith("hours_since_")]
    values[hours] = values[hours].fillna(_NEVER_HOURS)
    return np.log1p(np.clip(values.fillna(0.0).to_numpy(), 0.0, None))


def _lookup(vocab: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Model ids (1..len(vocab)) of ``ids`` in the sorted ``vocab``; 0 where unknown."""
    if len(vocab) == 0:
        return np.zeros(len(ids), np.int64)
    pos = np.clip(np.searchsorted(vocab, ids), 0, len(vocab) - 1)
    return np.where(vocab[pos] == ids, pos + 1, 0)


@dataclass
class TimeSplit:
    """Rows by snapshot day: the last day tests, the day before validates, earlier days train.

    Training stops ``horizon`` days before the validation day, the horizon being how far the label looks
    past its snapshot (its task's ``data.horizon_days``). A churn label of day D says whether the user is
    seen on D+1..D+3, so training on the two days before the validation day would teach the network
    which of its users are quiet on the very days the validation labels are about: the validation
    ROC-AUC then reaches the oracle's while the test day's stays far below, and early stopping and
    calibration, both fitted on the validation day, follow the leak.
    """

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    purged_days: int = 0  # snapshot days between training and validation, left out

    @classmethod
    def of(cls, frame: pd.DataFrame, source: str = "training set") -> TimeSplit:
        check_columns(frame, source)
        label = label_of(frame, source)
        horizon = HORIZON_DAYS[label]
        day = pd.to_datetime(frame[SNAPSHOT], utc=True).dt.date
        days = sorted(day.unique())
        train_days = [d for d in days[:-2] if d <= days[-2] - timedelta(days=horizon)]
        if not train_days:
            raise ShopsightError(
                f"{source}: {len(days)} snapshot day(s); the time split needs at least {horizon + 2} "
                f"for {label} (test on the last, validate on the one before, train on days at least "
                f"{horizon} day(s) before that, as the label looks {horizon} day(s) ahead)"
            )
        split = cls(
            frame[day <= train_days[-1]],
            frame[day == days[-2]],
            frame[day == days[-1]],
            purged_days=len(days) - 2 - len(train_days),
        )
        for name in ("train", "valid", "test"):
            if getattr(split, name)[label].nunique() < 2:
                raise ShopsightError(f"{source}: the {name} days have only one class of {label}")
        return split

    @property
    def label(self) -> str:
        return label_of(self.train)

    def describe(self) -> dict[str, str]:
        def days(f: pd.DataFrame) -> str:
            d = pd.to_datetime(f[SNAPSHOT], utc=True).dt.date
            return f"{d.min()} .. {d.max()}" if d.min() != d.max() else str(d.min())

        return {
            name: f"{days(getattr(self, name))}: {len(getattr(self, name)):,} rows, "
            f"{getattr(self, name)[self.label].mean():.1%} {self.label}"
            for name in ("train", "valid", "test")
        } | (
            {"left_out": f"{self.purged_days} day(s) whose labels reach past the validation day"}
            if self.purged_days
            else {}
        )


def read_training_set(path: Path | str, check: bool = True) -> pd.DataFrame:
    """A training-set parquet file (or folder), with a clear error when it is not one.

    ``check=False`` leaves the columns to the caller (the GAN needs only the label and some features).
    """
    path = Path(path)
    if not path.exists():
        raise ShopsightError(
            f"{path}: no such training set (make one with `shopsight features training-set`)"
        )
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several kinds for a file that is not parquet
        raise ShopsightError(f"{path}: not a parquet training set ({type(exc).__name__}: {exc})") from None
    if check:
        check_columns(frame, str(path))
    return frame
