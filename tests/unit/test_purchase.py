"""Purchase data, the purchase head of both sequence models, the loop, and the time split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tests.conftest import purchase_frame

from shopsight.platform import ShopsightError
from shopsight.training.binary.data import SnapshotFeatures, TimeSplit
from shopsight.training.binary.fit import (
    TreeBaseline,
    balanced_pos_weight,
    predict_probabilities,
    train_binary,
)
from shopsight.training.models import build_model
from shopsight.training.models._user_head import N_GAP_BUCKETS, transfer_pretrained
from shopsight.training.runtime.loop import LoopConfig


def _one_row(**overrides) -> pd.DataFrame:
    snapshot = pd.Timestamp("2017-12-01 16:00", tz="UTC")
    base = int(snapshot.timestamp())
    row = {
        "user_id": 7,
        "event_timestamp": snapshot,
        "buy_next_1d": True,
        "n_pv_1d": 2,
        "hours_since_buy": np.nan,
        "top_categories": np.array([5]),
        "seq_item_ids": np.array([11, 99, 12]),
        "seq_category_ids": np.array([5, 5, 6]),
        "seq_behaviors": np.array(["pv", "cart", "buy"], dtype=object),
        # 100 hours, 3 hours and 30 minutes before the snapshot
        "seq_ts": np.array([base - 100 * 3600, base - 3 * 3600, base - 1800]),
        "seq_length": 3,
        "segment_id": 1,
    }
    row.update(overrides)
    return pd.DataFrame([row])


def test_rows_become_left_padded_tensors_with_gap_buckets_and_unknown_items():
    frame = _one_row()
    features = SnapshotFeatures.fit(frame, item_ids=np.array([11, 12]), max_len=5)
    t = features.transform(frame)
    assert t.items.tolist() == [[0, 0, 1, 0, 2]]  # 99 is not in the vocabulary: id 0, yet an event
    assert t.behaviors.tolist() == [[0, 0, 1, 2, 4]]  # pv cart fav buy = 1 2 3 4
    assert t.categories.tolist() == [[0, 0, 1, 1, 2]]
    # bucket 1 + floor(log2(1 + hours)): 100 h -> 7, 3 h -> 3, 0.5 h -> 1
    assert t.gaps.tolist() == [[0, 0, 7, 3, 1]]
    # dense: n_pv_1d, hours_since_buy, seq_length (standardised), a "never bought" flag, the segment one-hot
    assert features.dense_columns == ["n_pv_1d", "hours_since_buy", "seq_length"]
    assert features.n_dense == 3 + 1 + 2
    assert t.dense[0, 3] == 1.0 and t.dense[0, 4:].tolist() == [0.0, 1.0]
    assert t.labels.tolist() == [1.0]


def test_long_sequences_keep_their_newest_events_and_the_gap_saturates():
    base = int(pd.Timestamp("2017-12-01 16:00", tz="UTC").timestamp())
    frame = _one_row(
        seq_item_ids=np.arange(1, 9),
        seq_category_ids=np.ones(8, int),
        seq_behaviors=np.array(["pv"] * 8, dtype=object),
        seq_ts=np.array([base - 10**8] + [base - 60] * 7),
    )
    t = SnapshotFeatures.fit(frame, max_len=4).transform(frame)
    assert t.items.tolist() == [[5, 6, 7, 8]]
    frame.loc[0, "seq_ts"][-1] = base - 10**9  # 277,778 hours: log2 > 16
    assert SnapshotFeatures.fit(frame, max_len=4).transform(frame).gaps[0, -1] == N_GAP_BUCKETS


def test_bad_purchase_data_gets_clear_errors():
    with pytest.raises(ShopsightError, match="empty"):
        SnapshotFeatures.fit(_one_row().iloc[:0])
    with pytest.raises(ShopsightError, match="missing column.*seq_item_ids"):
        SnapshotFeatures.fit(_one_row().drop(columns="seq_item_ids"))
    with pytest.raises(ShopsightError, match="1 snapshot day"):
        TimeSplit.of(_one_row())


def test_time_split_tests_on_the_last_day_and_validates_on_the_one_before():
    split = TimeSplit.of(purchase_frame(users=50, days=5))
    day = lambda f: set(pd.to_datetime(f["event_timestamp"]).dt.day)  # noqa: E731
    assert day(split.train) == {25, 26, 27} and day(split.valid) == {28} and day(split.test) == {29}


def test_time_split_trains_only_on_labels_that_end_before_the_validation_day():
    # churn_3d of day D looks at D+1..D+3: the labels of days 27-28 reach past the validation day (29)
    churn = purchase_frame(users=50, days=6).rename(columns={"buy_next_1d": "churn_3d"})
    split = TimeSplit.of(churn)
    day = lambda f: set(pd.to_datetime(f["event_timestamp"]).dt.day)  # noqa: E731
    assert day(split.train) == {25, 26} and day(split.valid) == {29} and day(split.test) == {30}
    assert split.purged_days == 2 and "2 day(s) whose labels reach past" in split.describe()["left_out"]
    with pytest.raises(ShopsightError, match="needs at least 5 for churn_3d"):
        TimeSplit.of(churn[pd.to_datetime(churn["event_timestamp"]).dt.day > 26])


@pytest.mark.parametrize("name", ["sasrec", "lstm"])
def test_purchase_head_learns_on_tiny_data(name):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    split = TimeSplit.of(purchase_frame(users=200, days=4))
    features = SnapshotFeatures.fit(split.train, max_len=20)
    train, valid = features.transform(split.train), features.transform(split.valid)
    model = build_model(
        name, n_items=features.n_items, n_dense=features.n_dense, n_categories=features.n_categories,
        max_len=20, d_model=16, dropout=0.1,
    )  # fmt: skip
    with torch.no_grad():
        before = float(model.user_loss(*map(torch.as_tensor, (*train.inputs(), train.labels)), torch.ones(1)))
    history = train_binary(
        model, train, valid, LoopConfig(epochs=3, batch_size=64, lr=3e-3, eval_every=1), log=lambda _: None
    )
    proba = predict_probabilities(model, valid)
    assert proba.shape == (len(valid),) and np.all((proba > 0) & (proba < 1))
    assert history[-1].loss < before
    # the signal (a last-day cart) is learnt: the labels' ceiling is a ROC-AUC of 0.78
    assert max(h.valid["roc_auc"] for h in history) > 0.75


def test_class_weight_is_non_buyers_per_buyer_and_changes_the_loss():
    labels = np.array([1, 0, 0, 0, 0], np.float32)
    assert balanced_pos_weight(labels) == 4.0
    model = build_model("sasrec", n_items=5, n_dense=2, n_categories=2, max_len=3, d_model=8)
    model.eval()
    seq = torch.tensor([[1, 2, 3]])
    inputs = (
        seq,
        torch.tensor([[1, 1, 2]]),
        torch.tensor([[1, 1, 2]]),
        torch.tensor([[3, 2, 1]]),
        torch.zeros(1, 2),
    )
    p = float(model.user_proba(*inputs))
    unweighted = float(model.user_loss(*inputs, torch.ones(1), torch.tensor([1.0])))
    weighted = float(model.user_loss(*inputs, torch.ones(1), torch.tensor([4.0])))
    assert unweighted == pytest.approx(-np.log(p), rel=1e-4)
    assert weighted == pytest.approx(4 * unweighted, rel=1e-4)


def test_pretraining_copies_the_encoder_not_the_head():
    next_item = build_model("sasrec", n_items=30, d_model=16, max_len=10)
    purchase = build_model("sasrec", n_items=30, d_model=16, max_len=10, n_dense=3, n_categories=4)
    copied = transfer_pretrained(purchase, next_item.state_dict())
    assert "item_emb.weight" in copied and any(k.startswith("blocks.") for k in copied)
    assert not any(k.startswith(("tower.", "side.")) for k in copied)
    assert torch.equal(purchase.item_emb.weight, next_item.item_emb.weight)


def test_tree_baseline_learns_the_signal_from_dense_features():
    split = TimeSplit.of(purchase_frame(users=200, days=4))
    features = SnapshotFeatures.fit(split.train)
    tree = TreeBaseline().fit(features.transform(split.train))
    from sklearn.metrics import roc_auc_score

    test = features.transform(split.test)
    # the labels' own ceiling (P(buy) 0.6 after a cart, else 0.1, 30% cart) is a ROC-AUC of 0.78
    assert roc_auc_score(test.labels, tree.predict(test)) > 0.7
