"""Distillation: the teachers' cached states give their exact mean logits, the soft cross-entropy by hand,
a distilled student ends closer to its teacher than one trained alone, and bad teachers are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shopsight.training.models import build_model
from shopsight.training.models._next_item_loss import soft_cross_entropy
from shopsight.training.next_item.data import LeaveOneOut, SequenceData, training_batches
from shopsight.training.next_item.distill import Teacher
from shopsight.training.next_item.fit import train_next_item
from shopsight.training.runtime.loop import LoopConfig

N_ITEMS = 30


def _split(users=120, seed=0) -> LeaveOneOut:
    """Random walks over 30 items with a strong next-item pattern and varying lengths (2..14 items)."""
    rng = np.random.default_rng(seed)
    user_col, item_col = [], []
    for u in range(users):
        item = int(rng.integers(1, N_ITEMS + 1))
        for _ in range(int(rng.integers(2, 15))):
            user_col.append(u)
            item_col.append(item)
            item = item % N_ITEMS + 1 if rng.random() < 0.8 else int(rng.integers(1, N_ITEMS + 1))
    return LeaveOneOut.split(SequenceData.from_pairs(np.array(user_col), np.array(item_col)))


def _model(seed, **kw):
    torch.manual_seed(seed)
    config = dict(n_items=N_ITEMS, max_len=8, d_model=16, n_blocks=1, dropout=0.0, loss="sampled_softmax")
    return build_model("sasrec", **{**config, **kw})


def test_cached_teacher_states_give_the_teachers_mean_logits():
    split = _split()
    teachers = [_model(1).eval(), _model(2, d_model=8).eval()]  # sizes may differ
    teacher = Teacher(teachers, split, max_len=8, weight=0.3)
    seq, pos, _, users = next(training_batches(split.train, 8, 16, np.random.default_rng(0), N_ITEMS))
    seq, pos = torch.as_tensor(seq), torch.as_tensor(pos)
    batch = teacher.batch(users)
    mask = pos > 0
    targets, negatives = pos[mask], torch.tensor([3, 7, 11])
    with torch.no_grad():
        hidden = [t.encode(seq)[mask] for t in teachers]
        expected = torch.stack(
            [
                torch.cat([(h * t.item_emb(targets)).sum(-1, keepdim=True), h @ t.item_emb(negatives).T], 1)
                for h, t in zip(hidden, teachers, strict=True)
            ]
        ).mean(0)
        every_item = torch.stack(
            [h @ t.item_emb.weight.T for h, t in zip(hidden, teachers, strict=True)]
        ).mean(0)
    assert batch.hidden.shape == (int(mask.sum()), 16 + 8) and batch.weight == 0.3
    assert torch.allclose(batch.logits(targets, negatives), expected, atol=1e-5)
    assert torch.allclose(batch.logits(targets, None), every_item, atol=1e-5)


def test_soft_cross_entropy_by_hand():
    student = torch.tensor([[0.0, math.log(2.0), float("-inf")]])
    teacher = torch.tensor([[0.0, 0.0, 5.0]])  # its third candidate is not one: it does not count
    # teacher (1/2, 1/2) against student log(1/3), log(2/3)
    assert float(soft_cross_entropy(student, teacher)) == pytest.approx(0.5 * math.log(4.5))


def test_a_distilled_student_ends_closer_to_its_teacher():
    split = _split()
    teacher = _model(0)
    train_next_item(teacher, split, LoopConfig(epochs=15, batch_size=32, eval_every=100), log=lambda _: None)
    teacher.eval()
    cfg = LoopConfig(epochs=6, batch_size=32, lr=5e-3, eval_every=100, distill_weight=0.9)
    alone, distilled = _model(5), _model(5)
    train_next_item(alone, split, cfg, log=lambda _: None)
    lines = []
    train_next_item(distilled, split, cfg, teachers=[teacher], log=lines.append)
    assert lines[0].startswith("distilling from 1 teacher(s)")
    _, seqs, _ = split.inputs("valid", 8)
    with torch.no_grad():
        target = torch.softmax(teacher.predict(torch.as_tensor(seqs))[:, 1:], 1)

        def kl(student):
            log_p = torch.log_softmax(student.eval().predict(torch.as_tensor(seqs))[:, 1:], 1)
            return float((target * (target.log() - log_p)).sum(1).mean())

        assert kl(distilled) < 0.6 * kl(alone)  # measured: 0.38x


def test_bad_teachers_are_refused():
    split = _split()
    with pytest.raises(ValueError, match="teacher 1 scores 20 items, the training data has 30"):
        Teacher([_model(0, n_items=20)], split, max_len=8)
    with pytest.raises(ValueError, match="teacher 1 reads 4 items, the student 8"):
        Teacher([_model(0, max_len=4)], split, max_len=8)
    with pytest.raises(ValueError, match="at least one teacher"):
        Teacher([], split, max_len=8)
    with pytest.raises(ValueError, match=r"weight must be in \(0, 1\]"):
        Teacher([_model(0)], split, max_len=8, weight=0.0)
    student = _model(1, loss="bce")
    with pytest.raises(ValueError, match="not bce"):
        train_next_item(student, split, LoopConfig(epochs=1, eval_every=100), teachers=[_model(0)])
