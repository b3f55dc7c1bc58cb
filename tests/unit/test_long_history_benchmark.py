"""The long-history benchmark runs end to end in small form: heavy simulated users have the long histories
it is for, the settings come from the data, and every run reports its plateau, CPU time and full-ranking
quality beside popularity."""

from __future__ import annotations

import json

import numpy as np
from benchmarks.bench_long_history import longest_half, main, markdown, merged

from shopsight.data import ACTIVITY_PROFILES, SimulatorConfig, simulate
from shopsight.training.next_item.data import SequenceData


def test_heavy_users_have_long_histories(tmp_path):
    cfg = SimulatorConfig(users=200, days=9, seed=0, **ACTIVITY_PROFILES["heavy"])
    simulate(cfg, tmp_path / "heavy")
    lengths = [len(s) for s in SequenceData.from_file(tmp_path / "heavy" / "events").sequences]
    assert np.median(lengths) >= 300  # what the profile promises
    simulate(SimulatorConfig(users=200, days=9, seed=0), tmp_path / "taobao")
    usual = [len(s) for s in SequenceData.from_file(tmp_path / "taobao" / "events").sequences]
    assert np.median(usual) < 100


def test_the_longest_half_keeps_whole_histories_of_the_longest_users():
    users = np.repeat([1, 2, 3, 4], [2, 5, 9, 3])
    items = np.arange(len(users)) + 100
    data = SequenceData.from_pairs(users, items)
    kept = longest_half(data)
    assert kept.user_ids.tolist() == [2, 3]
    assert [kept.item_ids[s].tolist() for s in kept.sequences] == [
        list(range(102, 107)),
        list(range(107, 116)),
    ]


def test_a_small_run_reports_the_plateau_cpu_time_and_quality(tmp_path):
    out = tmp_path / "result.json"
    result = main(["--datasets", "heavy", "--users", "40", "--max-epochs", "3", "--eval-every", "1",
                   "--runs", "sasrec:gbce", "lstm:sampled_softmax", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == result
    heavy = result["datasets"]["heavy"]
    assert heavy["choice"]["max_len"] >= 300  # chosen from the histories' 90th percentile
    runs = {(r["model"], r["loss"]): r for r in heavy["runs"]}
    assert set(runs) == {("popularity", "-"), ("sasrec", "gbce"), ("lstm", "sampled_softmax")}
    for key, run in runs.items():
        assert all(0 <= v <= 1 for v in run["test"].values()), key
        if key[0] != "popularity":
            assert 1 <= run["best_epoch"] <= run["stopped_epoch"] <= 3
            assert 0 < run["cpu_seconds_to_best"] <= run["cpu_seconds"]
            assert run["config"]["max_len"] == heavy["choice"]["max_len"]
    table = markdown(merged([result, result]))  # a run reported twice counts once
    rows = [line for line in table if line.startswith("| sasrec") or line.startswith("| lstm")]
    assert len(rows) == 2 and all(line.count("|") == 11 for line in rows)
