"""The user-embedding job: a next-item model's encoder over the sequence features, written as the
user_embedding table, materialised, and served online in user_profile_v1."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from shopsight.features import store
from shopsight.platform import ShopsightError

pytestmark = [pytest.mark.spark, pytest.mark.feast]


@pytest.fixture(scope="module")
def embedded(taobao_features, make_settings, tmp_path_factory):
    from shopsight.training.models import build_model
    from shopsight.training.next_item.embeddings import embed_users
    from shopsight.training.next_item.pyfunc import NextItemRecommender, save_model_dir

    base, _ = taobao_features
    folder = tmp_path_factory.mktemp("embedding")
    # the built tables, linked; user_embedding is this test's own
    (folder / "features").mkdir()
    for table in (base.data_dir.absolute() / "features").iterdir():
        (folder / "features" / table.name).symlink_to(table)
    settings = make_settings(folder)
    sequences = pd.read_parquet(base.data_dir.absolute() / "features" / "user_sequence")
    items = np.unique(np.concatenate(sequences["seq_item_ids"].to_numpy()))
    torch.manual_seed(0)
    model = build_model("sasrec", n_items=len(items), d_model=8, max_len=10)
    recommender = NextItemRecommender()
    recommender.load(save_model_dir(folder / "model", "sasrec", model, np.concatenate([[0], items])))
    store.apply(settings)
    with pytest.raises(ShopsightError, match="not built"):
        embed_users(settings, recommender, "models:/test/1", [pd.Timestamp("2030-01-01").date()])
    result = embed_users(settings, recommender, "models:/test/1")
    store.materialize(settings)
    return settings, recommender, result, sequences


def test_every_user_and_day_gets_the_encoders_last_state(embedded):
    from shopsight.training.next_item.embeddings import user_vectors

    settings, recommender, result, sequences = embedded
    assert result.rows == len(sequences) and result.dimension == 8 and len(result.days) == 8
    written = pd.read_parquet(settings.data_dir.absolute() / "features" / "user_embedding")
    assert len(written) == len(sequences)
    row = written.sort_values(["snapshot_day", "user_id"]).iloc[-1]
    source = sequences[
        (sequences.user_id == row.user_id) & (sequences.snapshot_day.astype(str) == str(row.snapshot_day))
    ].iloc[0]
    ids = np.searchsorted(recommender.item_ids, source.seq_item_ids)[-10:]
    padded = np.zeros((1, 10), np.int64)
    padded[0, 10 - len(ids) :] = ids
    expected = user_vectors(recommender.model, padded)[0]
    assert np.allclose(row.embedding, expected, atol=1e-5)


def test_the_embedding_is_served_in_user_profile_v1(embedded):
    settings, _, _, _ = embedded
    written = pd.read_parquet(settings.data_dir.absolute() / "features" / "user_embedding")
    last = written[written.snapshot_day.astype(str) == written.snapshot_day.astype(str).max()]
    users = sorted(last.user_id.sample(5, random_state=0).tolist())
    online = store.online_features(settings, "user_profile_v1", [{"user_id": u} for u in users])
    by_user = last.set_index("user_id")
    for user, vector, source in zip(users, online["embedding"], online["embedding_model"], strict=True):
        assert np.allclose(vector, by_user.loc[user, "embedding"], atol=1e-6)
        assert source == "models:/test/1"
    described = store.describe(settings, "user_embedding")
    assert described.owner == "shopsight_training" and {f.name for f in described.fields} >= {"embedding"}
