"""Next-item data: user sequences with contiguous item ids, the leave-one-out split, batches.

Protocol (docs/architecture.md): per user, in time order, the last item is the test target, the one before
it the validation target, the rest is training history. Users with fewer than 3 interactions only train.
Item ids are re-numbered 1..N (0 pads sequences on the left); ``item_ids[k]`` is item k's original id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

# Only numpy and torch at import time: the GPU checks run this on a machine with nothing else.


@dataclass
class SequenceData:
    """Every user's item sequence, oldest first, as contiguous ids (1..n_items)."""

    sequences: list[np.ndarray]
    user_ids: np.ndarray
    item_ids: np.ndarray  # item_ids[k] = original id of item k (item_ids[0] = 0, padding)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @classmethod
    def from_events(cls, events: pa.Table) -> SequenceData:
        """Sequences from events in the contract's schema (all behaviours, in time order)."""
        import pyarrow.compute as pc

        from shopsight.platform import ShopsightError

        if events.num_rows == 0:
            raise ShopsightError("no events: the sequence dataset is empty")
        missing = {"user_id", "item_id", "ts"} - set(events.column_names)
        if missing:
            raise ShopsightError(f"events lack column(s) {', '.join(sorted(missing))}")
        # a stable sort keeps the file's order among events of the same second
        order = pc.sort_indices(events, sort_keys=[("user_id", "ascending"), ("ts", "ascending")])
        users = events.column("user_id").take(order).to_numpy()
        items = events.column("item_id").take(order).to_numpy()
        return cls._from_sorted(users, items)

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray) -> SequenceData:
        """Sequences from (user, item) pairs already in time order (the SASRec text format)."""
        order = np.argsort(users, kind="stable")
        return cls._from_sorted(np.asarray(users)[order], np.asarray(items)[order])

    @classmethod
    def _from_sorted(cls, users: np.ndarray, items: np.ndarray) -> SequenceData:
        item_ids, contiguous = np.unique(items, return_inverse=True)
        contiguous = contiguous + 1
        boundaries = np.flatnonzero(np.diff(users)) + 1
        sequences = np.split(contiguous.astype(np.int64), boundaries)
        user_ids = users[np.concatenate([[0], boundaries])]
        return cls(sequences, user_ids, np.concatenate([[0], item_ids]))

    @classmethod
    def from_file(cls, path: Path | str, format: str = "auto") -> SequenceData:
        """Sequences from any event file the data contract reads (SASRec text, Taobao CSV, parquet), or
        from the ``user_sequence`` feature table (``<data_dir>/features/user_sequence``)."""
        from shopsight.data import EventReader

        if _is_sequence_table(Path(path)):
            return cls.from_sequence_table(path)
        return cls.from_events(EventReader(path, format).read_all())  # type: ignore[arg-type]

    @classmethod
    def from_sequence_table(cls, path: Path | str) -> SequenceData:
        """Sequences from the ``user_sequence`` feature table: each user's sequence at their latest
        snapshot day (its last 50 events, every behaviour), oldest first."""
        import pandas as pd

        from shopsight.platform import ShopsightError

        frame = pd.read_parquet(path, columns=["user_id", "snapshot_day", "seq_item_ids"])
        if frame.empty:
            raise ShopsightError(f"{path}: the sequence table is empty")
        frame["snapshot_day"] = frame["snapshot_day"].astype(str)
        latest = frame.sort_values(["user_id", "snapshot_day"]).groupby("user_id", sort=True).tail(1)
        lengths = latest["seq_item_ids"].map(len).to_numpy()
        users = np.repeat(latest["user_id"].to_numpy(np.int64), lengths)
        items = np.concatenate([np.asarray(s, np.int64) for s in latest["seq_item_ids"]])
        return cls._from_sorted(users, items)


def _is_sequence_table(path: Path) -> bool:
    """A parquet folder (or file) with the sequence feature's columns."""
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or files[0].suffix != ".parquet":
        return False
    try:
        return "seq_item_ids" in pq.read_schema(files[0]).names
    except Exception:  # noqa: BLE001 - not parquet after all: the event readers say what it is
        return False


@dataclass
class LeaveOneOut:
    """Training histories and the validation and test targets of the leave-one-out protocol."""

    train: list[np.ndarray]
    valid_target: np.ndarray  # (U,) 0 where the user has no held-out item
    test_target: np.ndarray
    n_items: int

    @classmethod
    def split(cls, data: SequenceData) -> LeaveOneOut:
        train, valid, test = [], [], []
        for seq in data.sequences:
            if len(seq) < 3:
                train.append(seq)
                valid.append(0)
                test.append(0)
            else:
                train.append(seq[:-2])
                valid.append(seq[-2])
                test.append(seq[-1])
        return cls(train, np.array(valid), np.array(test), data.n_items)

    def inputs(self, stage: str, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user index, padded input sequences (U, max_len), targets) of users with a ``stage`` target.

        Validation sees the training history; test sees the history plus the validation item.
        """
        target = self.valid_target if stage == "valid" else self.test_target
        users = np.flatnonzero(target > 0)
        seqs = np.zeros((len(users), max_len), dtype=np.int64)
        for row, u in enumerate(users):
            history = self.train[u] if stage == "valid" else np.append(self.train[u], self.valid_target[u])
            tail = history[-max_len:]
            seqs[row, max_len - len(tail) :] = tail
        return users, seqs, target[users]

    def seen(self, user: int, stage: str) -> np.ndarray:
        """Items the user interacted with that are not the stage's target (excluded from ranking)."""
        items = set(self.train[user].tolist())
        if stage == "test" and self.valid_target[user]:
            items.add(int(self.valid_target[user]))
        if stage == "valid" and self.test_target[user]:
            items.add(int(self.test_target[user]))
        items.discard(int((self.valid_target if stage == "valid" else self.test_target)[user]))
        return np.fromiter(items, dtype=np.int64)


def training_tails(train: list[np.ndarray], max_len: int, users: np.ndarray | None = None) -> np.ndarray:
    """(U, max_len + 1): each user's last ``max_len + 1`` training items, right-aligned, 0-padded.

    The training inputs are ``[:, :-1]`` and their next items ``[:, 1:]``; rows of users not in ``users``
    (default: every user) stay empty.
    """
    tails = np.zeros((len(train), max_len + 1), dtype=np.int64)
    for u in range(len(train)) if users is None else users:
        items = train[u][-(max_len + 1) :]
        tails[u, max_len + 1 - len(items) :] = items
    return tails


def training_inputs(train: list[np.ndarray], max_len: int) -> np.ndarray:
    """(U, max_len): every user's training input exactly as :func:`training_batches` feeds it."""
    return training_tails(train, max_len)[:, :-1]


def training_batches(
    train: list[np.ndarray],
    max_len: int,
    batch_size: int,
    rng: np.random.Generator,
    n_items: int,
    users: np.ndarray | None = None,
):
    """SASRec-style batches: (inputs, next items, one random unseen negative per position), each (B, T),
    and the batch's user indices (B,).

    Every user with at least 2 training items contributes its last ``max_len`` transitions. Batches are
    built with whole-array operations (the step is otherwise bound by Python on the CPU, GPU or not).
    """
    pool = np.flatnonzero(np.array([len(s) >= 2 for s in train])) if users is None else np.asarray(users)
    tails = training_tails(train, max_len, pool)
    # every (user, item) the user interacted with, as one sorted key, to reject negatives in one go
    width = n_items + 1
    seen = (
        np.unique(np.concatenate([u * width + train[u] for u in pool]))
        if len(pool)
        else np.empty(0, np.int64)
    )
    order = rng.permutation(pool)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        seq = tails[chunk, :-1]
        pos = np.where(seq > 0, tails[chunk, 1:], 0)
        neg = rng.integers(1, width, size=seq.shape)
        for _ in range(8):  # few negatives hit a seen item; a handful of redraws clears nearly all
            keys = chunk[:, None] * width + neg
            index = np.minimum(np.searchsorted(seen, keys), len(seen) - 1)
            clash = seen[index] == keys
            if not clash.any():
                break
            neg[clash] = rng.integers(1, width, size=int(clash.sum()))
        neg[pos == 0] = 0
        yield seq, pos, neg, chunk
