"""Training building blocks: metrics against hand-computed cases, models learn a pattern, data splits."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from shopsight.platform import ShopsightError
from shopsight.training.models import build_model
from shopsight.training.next_item.data import LeaveOneOut, SequenceData, training_batches, training_inputs
from shopsight.training.next_item.evaluate import evaluate_next_item, scorer
from shopsight.training.next_item.fit import train_next_item
from shopsight.training.runtime.loop import LoopConfig
from shopsight.training.runtime.metrics import binary_report, hit_rate, ndcg, rank_of_target


def test_rank_hr_ndcg_by_hand():
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.5, 0.3], [0.4, 0.4, 0.1]])
    assert rank_of_target(scores, 0).tolist() == [0, 2, 1]  # a tie counts against the target
    assert rank_of_target(scores, np.array([1, 1, 2])).tolist() == [2, 0, 2]
    ranks = np.array([0, 1, 9, 10])
    assert hit_rate(ranks, 10) == 0.75
    assert ndcg(ranks, 10) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4)
    assert hit_rate(np.array([0, 5]), 5) == 0.5


def test_binary_report_by_hand():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.1, 0.4, 0.35, 0.8])
    report = binary_report(labels, probs, threshold=0.3)
    assert report["roc_auc"] == pytest.approx(0.75)
    assert report["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert report["precision"] == pytest.approx(2 / 3) and report["recall"] == 1.0
    assert report["f1"] == pytest.approx(0.8)
    expected_loss = -np.mean(np.log([0.9, 0.6, 0.35, 0.8]))
    assert report["log_loss"] == pytest.approx(expected_loss)
    with pytest.raises(ValueError, match="both classes"):
        binary_report(np.array([1, 1]), np.array([0.2, 0.3]))


def _pattern_data(users=300, items=40, length=12, seed=0) -> SequenceData:
    """Each user walks items i, i+1, i+2, ... (cyclic): the next item is fully predictable."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        start = rng.integers(0, items)
        rows += [(u, 100 + (start + t) % items, t) for t in range(length)]
    users_, items_, ts = zip(*rows, strict=True)
    table = pa.table(
        {"user_id": users_, "item_id": items_, "ts": pa.array(ts).cast(pa.timestamp("s", tz="UTC"))}
    )
    return SequenceData.from_events(table)


def test_sequences_and_leave_one_out():
    data = _pattern_data(users=5, items=10, length=6)
    assert data.n_items == 10 and data.item_ids[0] == 0 and set(data.item_ids[1:]) == set(range(100, 110))
    split = LeaveOneOut.split(data)
    seq = data.sequences[0]
    assert (
        (split.train[0] == seq[:-2]).all()
        and split.valid_target[0] == seq[-2]
        and split.test_target[0] == seq[-1]
    )
    users, inputs, targets = split.inputs("test", max_len=6)
    assert inputs[0].tolist() == [0] + seq[:-1].tolist() and targets[0] == seq[-1]
    batches = list(training_batches(split.train, 6, 2, np.random.default_rng(0), data.n_items))
    seq_b, pos_b, neg_b, users_b = batches[0]
    assert seq_b.shape == pos_b.shape == neg_b.shape == (2, 6) and users_b.shape == (2,)
    assert ((neg_b == 0) == (pos_b == 0)).all()


def test_bad_sequence_inputs():
    with pytest.raises(ShopsightError, match="empty"):
        SequenceData.from_events(
            pa.table(
                {
                    "user_id": pa.array([], pa.int64()),
                    "item_id": pa.array([], pa.int64()),
                    "ts": pa.array([], pa.int64()),
                }
            )
        )
    with pytest.raises(ShopsightError, match="lack column.*ts"):
        SequenceData.from_events(pa.table({"user_id": [1], "item_id": [2]}))
    with pytest.raises(ShopsightError, match="unknown model 'gpt'"):
        build_model("gpt", n_items=3)
    with pytest.raises(ShopsightError, match="bad configuration"):
        build_model("sasrec", n_items=3, d_model=7, n_heads=2)


@pytest.mark.parametrize("loss", ["bce", "sampled_softmax", "softmax", "gbce"])
@pytest.mark.parametrize("name", ["sasrec", "lstm"])
def test_models_learn_a_predictable_sequence(name, loss):
    torch.manual_seed(0)
    data = _pattern_data()
    split = LeaveOneOut.split(data)
    model = build_model(
        name, n_items=data.n_items, max_len=10, d_model=32, dropout=0.1, loss=loss, n_negatives=16
    )
    seqs = torch.as_tensor(split.inputs("valid", 10)[1][:4])
    assert model.predict(seqs).shape == (4, data.n_items + 1)
    assert model.score(seqs, torch.ones(4, 7, dtype=torch.long)).shape == (4, 7)
    before = evaluate_next_item(scorer(model.eval()), split, "test", 10, n_negatives=20)
    history = train_next_item(
        model,
        split,
        LoopConfig(epochs=15, batch_size=32, lr=5e-3, eval_every=5, patience=100),
        log=lambda _: None,
    )
    assert history[-1].loss < 0.7 * history[0].loss
    after = evaluate_next_item(scorer(model.eval()), split, "test", 10, n_negatives=20)
    assert after["hr@10_full"] > 0.8 > before["hr@10_full"] + 0.3
    assert after["ndcg@10"] > 0.6


def test_training_batches_pair_inputs_with_next_items_and_unseen_negatives():
    data = _pattern_data(users=50, items=15, length=8)
    split = LeaveOneOut.split(data)
    rows = set()
    clashes = total = 0
    inputs = training_inputs(split.train, 10)
    for seq, pos, neg, users in training_batches(split.train, 10, 16, np.random.default_rng(1), data.n_items):
        assert (inputs[users] == seq).all()  # the batch says whose inputs it holds
        for s, p, n in zip(seq, pos, neg, strict=True):
            rows.add((tuple(s[s > 0]), tuple(p[p > 0])))
            mask = p > 0
            assert ((s > 0) == mask).all()
            user_items = set(s[s > 0]) | set(p[p > 0])
            clashes += sum(int(x) in user_items for x in n[mask])
            total += int(mask.sum())
    expected = {(tuple(t[:-1]), tuple(t[1:])) for t in split.train}
    assert rows == expected
    assert clashes / total < 0.01  # 6 of 15 items are each user's: without redraws 40% would clash


def test_sequences_from_the_feature_table_take_each_users_latest_snapshot(tmp_path):
    import pandas as pd

    from shopsight.training.next_item.data import SequenceData

    table = tmp_path / "user_sequence"
    for day, sequences in (("2017-11-25", {1: [5, 6], 2: [7]}), ("2017-11-26", {1: [5, 6, 9]})):
        folder = table / f"snapshot_day={day}"
        folder.mkdir(parents=True)
        frame = pd.DataFrame({"user_id": list(sequences), "seq_item_ids": list(sequences.values())})
        frame.to_parquet(folder / "part-00000.parquet")
    data = SequenceData.from_file(table)
    assert data.user_ids.tolist() == [1, 2]
    assert [data.item_ids[s].tolist() for s in data.sequences] == [[5, 6, 9], [7]]


def test_weight_average_is_the_mean_of_the_snapshots_and_resumes():
    from shopsight.training.runtime.loop import WeightAverage

    layer = torch.nn.Linear(2, 1)
    snapshots = []
    average = WeightAverage()
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            layer.weight.fill_(value)
        snapshots.append(layer.weight.clone())
        average.update(layer)
        if value == 2.0:
            resumed = WeightAverage(average.state())  # a checkpoint after two snapshots
    resumed.update(layer)
    assert average.count == resumed.count == 3
    assert torch.allclose(average.mean["weight"], torch.full((1, 2), 3.0))
    assert torch.equal(average.mean["weight"], resumed.mean["weight"])


def test_swa_keeps_the_trajectory_and_returns_the_average_of_the_epochs_up_to_the_best():
    split = LeaveOneOut.split(_pattern_data(users=120, items=30, length=10))
    config = dict(n_items=split.n_items, max_len=8, d_model=16, n_blocks=1, dropout=0.0, loss="bce")
    cfg = LoopConfig(epochs=5, batch_size=32, lr=5e-3, eval_every=1, patience=100)
    torch.manual_seed(0)
    plain = build_model("sasrec", **config)
    plain_history = train_next_item(plain, split, cfg, log=lambda _: None)
    torch.manual_seed(0)
    averaged = build_model("sasrec", **config)
    snapshots = []

    def keep(result, model, optimizer, average):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        assert (average.count, result.epoch) in {(0, 1), (result.epoch - 1, result.epoch)}

    history = train_next_item(averaged, split, replace(cfg, swa_start=2), on_epoch=keep, log=lambda _: None)
    assert [h.loss for h in history] == [h.loss for h in plain_history]  # training is untouched
    assert history[0].valid == plain_history[0].valid  # epoch 1 comes before the average
    best = max(history, key=lambda h: h.valid["ndcg@10"]).epoch
    for name, value in averaged.state_dict().items():
        if value.is_floating_point():
            expected = (
                torch.stack([s[name] for s in snapshots[1:best]]).mean(0) if best > 1 else snapshots[0][name]
            )
            assert torch.allclose(value, expected, atol=1e-6), name


def test_gbce_is_bce_with_the_positive_term_raised_to_beta():
    """gBCE (Petrov & Macdonald 2023): beta = alpha * (t * (1 - 1/alpha) + 1/alpha), alpha the sampled share
    of the other items; the positive's probability to the power beta, the negatives' BCE as is (on logits
    shifted to the best constant score)."""
    from torch.nn import functional as F

    from shopsight.training.models._next_item_loss import gbce, gbce_beta

    assert gbce_beta(16, 1001, 0.0) == pytest.approx(1.0)  # t = 0: plain BCE
    assert gbce_beta(16, 1001, 1.0) == pytest.approx(16 / 1000)  # t = 1: beta = alpha
    assert gbce_beta(16, 1001, 0.75) == pytest.approx(0.75 * 0.016 + 0.25)
    assert gbce_beta(5000, 1001, 0.75) == pytest.approx(1.0)  # every item sampled: nothing to correct
    torch.manual_seed(0)
    logits = torch.randn(6, 1 + 4)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1
    # on logits shifted by log(beta / S), the best constant score (S = 4 negatives here)
    shifted = logits + math.log(1.0 / 4)
    plain = F.binary_cross_entropy_with_logits(shifted, labels)
    assert gbce(logits, 1.0) == pytest.approx(float(plain))
    beta = 0.3
    shifted = logits + math.log(beta / 4)
    by_hand = (
        -(torch.sigmoid(shifted[:, 0]) ** beta).log().sum() - (1 - torch.sigmoid(shifted[:, 1:])).log().sum()
    )
    assert gbce(logits, beta) == pytest.approx(float(by_hand / logits.numel()), rel=1e-5)
    masked = logits.clone()
    masked[0, 1] = float("-inf")  # a sampled negative that is the true item adds nothing
    assert torch.isfinite(gbce(masked, beta))


def test_gbce_ranks_a_larger_catalogue_with_many_negatives():
    """gBCE over 400 items with 128 negatives (beta 0.49): the logits' shift to the best constant score
    keeps the model from settling on that constant. Without it every item got the same score (-5.6,
    log(beta / 128)) and the test HR@10 was 0.15 after 20 epochs."""
    torch.manual_seed(0)
    data = _pattern_data(users=200, items=400, length=100)
    split = LeaveOneOut.split(data)
    model = build_model("sasrec", n_items=data.n_items, max_len=100, d_model=32, dropout=0.1, loss="gbce",
                        n_negatives=128)  # fmt: skip
    train_next_item(model, split, LoopConfig(epochs=8, batch_size=32, lr=5e-3, eval_every=8, patience=100),
                    log=lambda _: None)  # fmt: skip
    after = evaluate_next_item(scorer(model.eval()), split, "test", 100, n_negatives=100)
    assert after["hr@10_full"] > 0.9, after  # random: 10 of 400
