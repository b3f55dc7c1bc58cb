"""Next-item data: user sequences with contiguous item ids, the leave-one-out split, batches.

Protocol (architecture.md): per user, in time order, the last item is the test target, the one before
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
        """Sequences from any event file the data contract reads (SASRec text, Taobao CSV, parquet)."""
        from shopsight.data import EventReader

        return cls.from_events(EventReader(path, format).read_all())  # type: ignore[arg-type]


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


def training_batches(
    train: list[np.ndarray],
    max_len: int,
    batch_size: int,
    rng: np.random.Generator,
    n_items: int,
    users: np.ndarray | None = None,
):
    """SASRec-style batches: (inputs, next items, one random unseen negative per position), each (B, T).

    Every user with at least 2 training items contributes its last ``max_len`` transitions.
    """
    pool = np.flatnonzero(np.array([len(s) >= 2 for s in train])) if users is None else users
    order = rng.permutation(pool)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        seq = np.zeros((len(chunk), max_len), dtype=np.int64)
        pos = np.zeros_like(seq)
        for row, u in enumerate(chunk):
            items = train[u][-(max_len + 1) :]
            inp, nxt = items[:-1], items[1:]
            seq[row, max_len - len(inp) :] = inp
            pos[row, max_len - len(nxt) :] = nxt
        neg = rng.integers(1, n_items + 1, size=seq.shape)
        # resample negatives that hit one of the user's items (rare with many items: two passes suffice)
        for row, u in enumerate(chunk):
            user_items = train[u]
            clash = np.isin(neg[row], user_items)
            for _ in range(3):
                if not clash.any():
                    break
                neg[row, clash] = rng.integers(1, n_items + 1, size=int(clash.sum()))
                clash = np.isin(neg[row], user_items)
        neg[pos == 0] = 0
        yield seq, pos, neg
