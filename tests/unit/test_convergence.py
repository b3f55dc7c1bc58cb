"""Training to convergence: the plateau stops a run (patience in whole validations), the learning-rate
schedule and the loop's progress survive a resumption, weight averaging starts where the validation curve
flattens, and the next-item settings a user leaves out are chosen from the data."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from shopsight.cli import app
from shopsight.training.models import build_model
from shopsight.training.next_item.data import LeaveOneOut, SequenceData
from shopsight.training.next_item.defaults import DataStats, choose
from shopsight.training.next_item.fit import train_next_item
from shopsight.training.runtime.loop import LoopConfig
from shopsight.training.runtime.tracking import TrainSummary

QUIET = {"log": lambda _: None}


def _walks(users: int = 120, items: int = 30, length: int = 10, seed: int = 0) -> LeaveOneOut:
    """Each user walks items i, i+1, ... (cyclic): a tiny problem whose validation NDCG plateaus."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, items, size=users)
    rows = [(u, 100 + (starts[u] + t) % items, t) for u in range(users) for t in range(length)]
    u, i, t = zip(*rows, strict=True)
    table = pa.table({"user_id": u, "item_id": i, "ts": pa.array(t).cast(pa.timestamp("s", tz="UTC"))})
    return LeaveOneOut.split(SequenceData.from_events(table))


def _model(split: LeaveOneOut, **config):
    torch.manual_seed(0)
    base = dict(n_items=split.n_items, max_len=8, d_model=16, n_blocks=1, dropout=0.0, loss="bce")
    return build_model("sasrec", **{**base, **config})


def test_patience_counts_whole_validations():
    assert LoopConfig(eval_every=5).patience_epochs == 20  # default: 4 validations
    assert LoopConfig(eval_every=1).patience_epochs == 4
    assert LoopConfig(eval_every=2, patience=3).patience_epochs == 4  # rounded up to whole validations
    assert LoopConfig(eval_every=5, patience=1).patience_epochs == 5  # at least one validation
    with pytest.raises(ValueError, match="swa_start"):
        LoopConfig(swa_start="soon")
    with pytest.raises(ValueError, match="lr_schedule"):
        LoopConfig(lr_schedule="exponential")


def test_training_stops_at_the_validation_plateau_and_says_what_it_cost():
    split = _walks()
    cfg = LoopConfig(epochs=200, batch_size=32, lr=5e-3, eval_every=2, patience=4)
    history = train_next_item(_model(split), split, cfg, **QUIET)
    best = max(history, key=lambda h: (h.valid.get("ndcg@10", -1), -h.epoch))
    # stopped two validations (4 epochs) after the best, far below the 200-epoch cap
    assert history[-1].epoch == best.epoch + 4 < 60
    assert all(h.best_epoch == best.epoch for h in history if h.epoch >= best.epoch)
    later = [h.valid["ndcg@10"] for h in history if h.valid and h.epoch > best.epoch]
    assert len(later) == 2 and max(later) <= best.valid["ndcg@10"]
    cpu = [h.cpu_seconds for h in history]
    assert all(b > a for a, b in zip(cpu, cpu[1:], strict=False)) and cpu[0] > 0
    # the best epoch's cost is what the loop recorded when it got there
    assert history[-1].loop_state["progress"]["cpu_seconds_at_best"] == best.cpu_seconds


def _interrupted_after(split, cfg, epoch):
    """A run stopped by an exception after ``epoch``, and the checkpoint it left (as Ray Train's)."""
    saved = {}

    def checkpoint(result, model, optimizer, average):
        saved.update(
            model={k: v.clone() for k, v in model.state_dict().items()},
            optimizer=optimizer.state_dict(),
            average=average.state() if average else None,
            loop=result.loop_state,
            epoch=result.epoch,
        )
        if result.epoch == epoch:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_next_item(_model(split), split, cfg, on_epoch=checkpoint, **QUIET)
    return saved


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_the_schedule_and_the_loops_progress_survive_a_resumption(schedule):
    split = _walks()
    cfg = LoopConfig(epochs=16, batch_size=32, lr=5e-3, eval_every=1, patience=100, lr_schedule=schedule,
                     warmup_epochs=3, swa_start="auto", swa_threshold=0.05)  # fmt: skip
    whole = train_next_item(_model(split), split, cfg, **QUIET)
    lrs = [h.lr for h in whole]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] < lrs[2] < lrs[3] == pytest.approx(5e-3)  # warm-up
    if schedule == "cosine":
        assert (
            all(a > b for a, b in zip(lrs[3:], lrs[4:], strict=False)) and lrs[-1] > 5e-5
        )  # to 1% at the cap
    else:  # halved after each validation that brought no better metric, once warmed up
        worse = [
            h.epoch
            for h in whole[3:-1]
            if h.valid["ndcg@10"] <= max(x.valid["ndcg@10"] for x in whole[: h.epoch - 1])
        ]
        assert len(worse) >= 3  # the tiny problem plateaus within the run
        assert [whole[e].lr for e in worse] == [pytest.approx(whole[e - 1].lr / 2) for e in worse]

    saved = _interrupted_after(split, cfg, 10)
    model = _model(split)
    model.load_state_dict(saved["model"])
    rest = train_next_item(
        model, split, cfg, start_epoch=10, optimizer_state=saved["optimizer"],
        average_state=saved["average"], loop_state=saved["loop"], **QUIET,
    )  # fmt: skip
    assert [h.epoch for h in rest] == list(range(11, 17))
    assert 0 < saved["loop"]["progress"]["swa_from"] <= 10  # the average began before the interruption
    for resumed, straight in zip(rest, whole[10:], strict=True):
        assert resumed.lr == pytest.approx(straight.lr, rel=1e-12)
        assert resumed.loss == pytest.approx(straight.loss, rel=1e-5)
        assert resumed.valid == pytest.approx(straight.valid, rel=1e-5)
        assert resumed.best_epoch == straight.best_epoch
        assert resumed.loop_state["progress"]["swa_from"] == straight.loop_state["progress"]["swa_from"]
    # CPU seconds continue from the checkpoint's count rather than starting again
    assert rest[0].cpu_seconds > saved["loop"]["progress"]["cpu_seconds"]


def test_auto_swa_starts_where_the_validation_curve_flattens():
    split = _walks()
    cfg = LoopConfig(epochs=12, batch_size=32, lr=5e-3, eval_every=1, patience=100)
    plain = train_next_item(_model(split), split, cfg, **QUIET)
    curve = [h.valid["ndcg@10"] for h in plain]
    threshold = 0.02
    # where the plain curve first improves on its best so far by less than 2% (or not at all)
    flat = next(e for e in range(1, len(curve)) if curve[e] - max(curve[:e]) < threshold * max(curve[:e])) + 1
    assert 2 < flat < 12  # the tiny problem does flatten within the run, after a rise

    counts = {}
    averaged_run = train_next_item(
        _model(split), split, replace(cfg, swa_start="auto", swa_threshold=threshold),
        on_epoch=lambda result, model, optimizer, average: counts.__setitem__(result.epoch, average.count),
        **QUIET,
    )  # fmt: skip
    assert [h.loss for h in averaged_run] == [h.loss for h in plain]  # training itself is untouched
    assert [h.valid for h in averaged_run[:flat]] == [h.valid for h in plain[:flat]]  # raw until then
    assert counts == {e: max(0, e - flat + 1) for e in range(1, 13)}  # averaging from the flat epoch on
    assert averaged_run[-1].loop_state["progress"]["swa_from"] == flat


# ------------------------------------------------------------------------------- defaults from the data


def _sequences(lengths, items: int, seed: int = 0) -> SequenceData:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(len(lengths)), lengths)
    return SequenceData.from_pairs(users, rng.integers(1, items + 1, size=int(np.sum(lengths))))


def test_data_stats_read_the_history_lengths_and_the_catalogue():
    stats = DataStats.of(_sequences([1, 2, 3, 4, 5, 6, 7, 8, 9, 100], items=20))
    assert (stats.users, stats.interactions) == (10, 145)
    assert stats.items == 20 and stats.per_item == pytest.approx(145 / 20)
    assert stats.history_p50 == 5.5 and stats.history_p90 == pytest.approx(9 + 0.1 * 91)


def test_games_statistics_give_the_recorded_best_recipe():
    # games.txt as measured: 31,013 users, 23,715 items, 287,107 events; histories median 6, p90 15
    games = DataStats(users=31_013, items=23_715, interactions=287_107, history_p50=6, history_p90=15)
    choice = choose(games, "sasrec")
    assert choice.values == {
        "loss": "sampled_softmax", "max_len": 50, "d_model": 50, "dropout": 0.5, "n_negatives": 256,
    }  # fmt: skip
    assert choice.reasons["max_len"] == "90% of histories have at most 15 events"
    lstm = choose(games, "lstm").values
    assert (lstm["d_model"], lstm["hidden"], lstm["dropout"]) == (64, 128, 0.3)  # the recorded LSTM run's


def test_long_dense_histories_get_longer_inputs_wider_embeddings_and_less_dropout():
    rng = np.random.default_rng(1)
    short = choose(DataStats.of(_sequences(rng.integers(3, 20, size=2000), items=3000)))
    medium = choose(DataStats.of(_sequences(rng.integers(60, 140, size=400), items=1000)))
    long = choose(DataStats.of(_sequences(rng.integers(150, 330, size=500), items=800)))
    assert (short.values["max_len"], short.values["d_model"], short.values["dropout"]) == (50, 50, 0.5)
    assert (medium.values["max_len"], medium.values["d_model"], medium.values["dropout"]) == (150, 128, 0.3)
    assert (long.values["max_len"], long.values["d_model"], long.values["dropout"]) == (350, 256, 0.2)
    huge = DataStats(users=10**6, items=10**7, interactions=10**9, history_p50=300, history_p90=2000)
    assert choose(huge).values["max_len"] == 400  # the cap
    catalogue = {
        n: choose(DataStats(1000, n, 10**6, 5, 10)).values["n_negatives"] for n in (10**4, 10**5, 10**6)
    }
    assert catalogue == {10**4: 256, 10**5: 512, 10**6: 1024}


def test_what_the_user_set_wins_and_the_rest_is_chosen_and_logged(tmp_path):
    from shopsight.training.next_item.train import prepare

    rng = np.random.default_rng(2)
    path = tmp_path / "long.txt"
    path.write_text("".join(f"{u} {i}\n" for u in range(1, 120) for i in rng.integers(1, 200, size=150)))
    prepared = prepare(None, "sasrec", path, model_config={"max_len": 20, "loss": "bce"}, from_data=True)
    config = prepared.config["model_config"]
    assert (config["max_len"], config["loss"]) == (20, "bce")  # given
    assert (config["d_model"], config["dropout"], config["n_negatives"]) == (128, 0.3, 256)  # chosen
    assert set(k for k in prepared.params if k.startswith("chosen.")) == {
        "chosen.d_model", "chosen.dropout", "chosen.n_negatives",
    }  # fmt: skip
    assert (
        prepared.params["chosen.d_model"]
        == "long histories, items seen 20+ times (89.7 interactions per item)"
    )
    first, second = prepared.notes
    assert first == (
        "settings from the data: loss bce (given), max_len 20 (given), d_model 128, dropout 0.3, "
        "n_negatives 256"
    )
    assert second.startswith("why: d_model: long histories") and "max_len" not in second
    plain = prepare(None, "sasrec", path, model_config={"max_len": 20})
    assert (
        plain.notes == ()
        and "d_model" not in plain.params
        and plain.config["model_config"] == {"max_len": 20}
    )


def test_the_run_summary_says_where_and_why_training_stopped():
    summary = TrainSummary("r", "m", "name", "1", {}, {}, epochs=45, seconds=10.0, stopped_epoch=65,
                           epochs_cap=400, cpu_seconds_to_best=812.4, cpu_seconds=1100.0)  # fmt: skip
    assert (
        summary.convergence()
        == "best epoch 45, stopped at epoch 65 (the validation plateau), 812 CPU s to the best"
    )
    capped = replace(summary, stopped_epoch=400, cpu_seconds_to_best=None)
    assert capped.convergence() == "best epoch 45, stopped at epoch 400 (the epochs cap)"


def test_train_help_shows_the_plateau_default_and_rejects_a_bad_swa_start():
    runner = CliRunner()
    help_text = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "1000"}).output.split())
    assert "until the plateau, at most 400 (next item)" in help_text
    assert "<constant|cosine|plateau>" in help_text
    result = runner.invoke(app, ["train", "--data", ".", "--swa-start", "soon"])
    message = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    assert result.exit_code == 2 and "'soon' is neither an epoch number nor 'auto'" in message
