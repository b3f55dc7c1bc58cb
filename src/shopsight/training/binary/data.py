"""Data of the binary tasks on user snapshots (purchase, churn): a point-in-time training set of the
task's feature service (one row per user and snapshot day: the label, the activity features, the event
sequence, the segment), its label and the time split of docs/architecture.md. A training set holds exactly
one label column, which says its task (:func:`label_of`). How rows become model inputs
(:class:`SnapshotFeatures`) is :mod:`.features`, which travels with the registered model.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pandas as pd

from shopsight.platform import ShopsightError
from shopsight.training.binary.features import (
    REQUIRED,
    SEQUENCE_COLUMNS,
    SNAPSHOT,
    SnapshotFeatures,
    SnapshotTensors,
    check_rows,
)
from shopsight.training.tasks import TASKS

# every label a training set may carry: the binary tasks' (one per training set)
LABELS = tuple(sorted({t.data.label for t in TASKS.values() if t.data.label}))
# how far each label looks past its snapshot (the furthest any task that uses it declares)
HORIZON_DAYS = {
    label: max(t.data.horizon_days for t in TASKS.values() if t.data.label == label) for label in LABELS
}
# not dense features: ids, the label, arrays, and the segment (one-hot apart)
NOT_DENSE = {"user_id", SNAPSHOT, *LABELS, "segment_id", "top_categories", *SEQUENCE_COLUMNS}


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
    check_rows(frame, source)
    if need_label:
        label_of(frame, source)


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


__all__ = [
    "HORIZON_DAYS",
    "LABELS",
    "NOT_DENSE",
    "REQUIRED",
    "SEQUENCE_COLUMNS",
    "SNAPSHOT",
    "SnapshotFeatures",
    "SnapshotTensors",
    "TimeSplit",
    "check_columns",
    "label_of",
    "read_training_set",
]
