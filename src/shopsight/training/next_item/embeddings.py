"""User embeddings for other teams: a batch job that runs a registered next-item model's encoder over
every user's behaviour sequence (the ``user_sequence`` feature table) and writes the last hidden state
as the ``user_embedding`` feature table, one partition per snapshot day, which the Feast view
``user_embedding`` (in ``user_profile_v1``) serves.

The encoder runs in this process with PyTorch (batched, no gradients): a day of a million users is a few
minutes of CPU, which a Spark UDF would not shorten on one machine. Each day is written to a staging
folder and swapped in with one rename, like the feature jobs: re-running a day replaces it and nothing else.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from shopsight.data import publish_dir
from shopsight.features.jobs import CREATED_TS, SNAPSHOT_DAY, SNAPSHOT_TS
from shopsight.platform import Settings, ShopsightError, progress_bar

TABLE = "user_embedding"


@dataclass
class EmbeddingResult:
    model_uri: str
    dimension: int
    days: list[str]
    rows: int
    out: Path
    seconds: float


def user_vectors(model: torch.nn.Module, sequences: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The encoder's last hidden state (N, D) of left-padded model-id sequences (N, T)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            seq = torch.as_tensor(sequences[start : start + batch_size])
            out.append(model.encode(seq)[:, -1].float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.d_model), np.float32)


def write_user_embeddings(
    settings: Settings, model_uri: str, days: list[date] | None = None, batch_size: int = 1024
) -> EmbeddingResult:
    """Embed every user of the ``user_sequence`` table with the registered model ``model_uri``
    (``days``: only those snapshot days).

    Raises:
        ShopsightError: no sequence features (run ``features build``), a model that is not a next-item
            model, or a snapshot day that was not built.
    """
    from shopsight.training.next_item.evaluate import load_recommender

    source = _sequence_table(settings)
    return embed_users(settings, load_recommender(settings, model_uri), model_uri, days, batch_size, source)


def _sequence_table(settings: Settings) -> Path:
    source = Path(settings.data_dir).absolute() / "features" / "user_sequence"
    if not any(source.glob(f"{SNAPSHOT_DAY}=*")):
        raise ShopsightError(f"no sequence features under {source}: run `shopsight features build` first")
    return source


def embed_users(
    settings: Settings,
    recommender,
    model_uri: str,
    days: list[date] | None = None,
    batch_size: int = 1024,
    source: Path | None = None,
) -> EmbeddingResult:
    """:func:`write_user_embeddings` with the model already loaded (a ``NextItemRecommender``)."""
    started = time.perf_counter()
    source = source or _sequence_table(settings)
    built = sorted(p.name.split("=", 1)[1] for p in source.glob(f"{SNAPSHOT_DAY}=*"))
    wanted = [d.isoformat() for d in days] if days else built
    missing = sorted(set(wanted) - set(built))
    if missing:
        raise ShopsightError(f"snapshot day(s) {', '.join(missing)} not built under {source}")
    model, max_len = recommender.model, recommender.max_len
    vocab = np.asarray(recommender.item_ids[1:])  # sorted: ids 1..n
    out = source.parent / TABLE
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    with progress_bar() as progress:
        task = progress.add_task("embedding users", total=len(wanted))
        for day in wanted:
            columns = ["user_id", SNAPSHOT_TS, "seq_item_ids"]
            frame = pd.read_parquet(source / f"{SNAPSHOT_DAY}={day}", columns=columns)
            sequences = np.zeros((len(frame), max_len), np.int64)
            for row, items in enumerate(frame["seq_item_ids"]):
                items = np.asarray(items if items is not None else [], np.int64)
                pos = np.clip(np.searchsorted(vocab, items), 0, max(len(vocab) - 1, 0))
                known = (pos + 1)[vocab[pos] == items][-max_len:]  # unknown items are skipped
                if len(known):
                    sequences[row, max_len - len(known) :] = known
            vectors = user_vectors(model, sequences, batch_size)
            table = pa.table(
                {
                    "user_id": pa.array(frame["user_id"].to_numpy(np.int64)),
                    SNAPSHOT_TS: pa.array(frame[SNAPSHOT_TS]).cast(pa.timestamp("us", tz="UTC")),
                    CREATED_TS: pa.array([datetime.now(UTC)] * len(frame), pa.timestamp("us", tz="UTC")),
                    "embedding": pa.array(list(vectors), pa.list_(pa.float32())),
                    "embedding_model": pa.array([model_uri] * len(frame), pa.string()),
                }
            )
            _publish_day(table, out / f"{SNAPSHOT_DAY}={day}")
            rows += len(frame)
            progress.advance(task)
    return EmbeddingResult(
        model_uri, int(model.cfg.d_model), wanted, rows, out, time.perf_counter() - started
    )


def _publish_day(table: pa.Table, target: Path) -> None:
    staging = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        pq.write_table(table, staging / "part-00000.parquet")
        publish_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
