"""The monitor's parts on hand-made cases: the join of answers with what followed, the online metrics and
their intervals, the oracle's expected ROC-AUC, drift (PSI and KS against scipy), skew, alerts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from shopsight.monitoring import outcomes, skew, stats
from shopsight.monitoring.monitor import (
    MonitorReport,
    TaskReport,
    VersionReport,
    alerts,
    day_window,
    end_of_day,
    expected_roc_auc,
)
from shopsight.platform import load_settings
from shopsight.training.tasks import FollowUp

AS_OF = datetime(2017, 12, 2, 16, 0, tzinfo=UTC)  # the end of 2017-12-02 in Shanghai


def _answer(request_id, user_id, alias="champion", as_of=AS_OF, items=None, probability=None, at=0):
    return {
        "request_id": request_id,
        "time": AS_OF + timedelta(seconds=at),
        "user_id": user_id,
        "alias": alias,
        "version": "1" if alias == "champion" else "2",
        "model": "m",
        "as_of": as_of,
        "items": items,
        "probability": probability,
        "features": "{}",
        "features_unavailable": False,
    }


def _events(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "behavior", "ts"]).astype(
        {"ts": "datetime64[us, UTC]"}
    )


def test_the_join_labels_within_the_window_and_leaves_late_unseen_and_pending_apart():
    h = timedelta(hours=1)
    answers = outcomes.unique_answers(
        pd.DataFrame(
            [
                _answer("a", 1),  # buys 2 h later: positive
                _answer("b", 2),  # buys 25 h later: a late outcome, not within the day: negative
                _answer("c", 3),  # never seen again: negative for "buys", unseen for "next item"
                _answer("d", 4, as_of=AS_OF + 20 * h),  # its day is not over in the events: pending
                _answer("a", 1, at=3),  # the same request logged twice (a retry): counted once
                _answer("e", 5),  # only views: not a purchase
            ]
        )
    )
    assert len(answers) == 5
    events = _events(
        [
            (1, 100, "pv", AS_OF + 1 * h),
            (1, 100, "buy", AS_OF + 2 * h),
            (2, 200, "buy", AS_OF + 25 * h),
            (4, 400, "buy", AS_OF + 21 * h),
            (5, 500, "pv", AS_OF - 1 * h),  # before the answer: not what followed it
            (5, 501, "pv", AS_OF + 3 * h),
        ]
    )
    until = AS_OF + 30 * h
    buys = outcomes.label(answers, events, FollowUp("happens", 1, ("buy",)), until).set_index("request_id")
    assert buys.loc[["a", "b", "c", "e"], "status"].tolist() == ["labelled"] * 4
    assert buys.loc[["a", "b", "c", "e"], "outcome"].tolist() == [True, False, False, False]
    assert buys.loc["d", "status"] == "pending" and buys.loc["d", "outcome"] is None
    nxt = outcomes.label(answers, events, FollowUp("next_item", 1), until).set_index("request_id")
    assert nxt.loc["a", "outcome"] == 100 and nxt.loc["e", "outcome"] == 501
    assert nxt.loc[["b", "c"], "status"].tolist() == ["unseen", "unseen"]  # b's event is past the day
    churn = outcomes.label(answers, events, FollowUp("absent", 1), until).set_index("request_id")
    assert churn.loc[["a", "b", "c", "e"], "outcome"].tolist() == [False, True, True, False]


def test_a_day_window_holds_the_answers_made_as_of_its_end():
    start, end = day_window("2017-12-02", "Asia/Shanghai")
    assert start < AS_OF < end and end - start == timedelta(days=1)
    assert end_of_day("2017-12-02", "Asia/Shanghai") == AS_OF  # what a replay of the day answers as of
    assert not start <= AS_OF - timedelta(days=1) < end  # the day before's replay


def test_online_ranking_metrics_and_their_intervals():
    items = pd.Series([[5, 6, 7], [7, 8, 9], [1, 2, 3], [9, 5, 1]])
    outcome = pd.Series([6, 9, 4, 9])
    values = stats.ranking_values(items, outcome, k=3)
    assert values["hr@3"].tolist() == [1, 1, 0, 1]
    assert values["ndcg@3"] == pytest.approx([1 / np.log2(3), 1 / np.log2(4), 0, 1])
    function = stats.metric_function("ranking", "hr@3", values)
    e = stats.estimate(function, 4, samples=500, seed=0)
    assert e.value == 0.75 and 0 <= e.lo <= e.value <= e.hi <= 1


def test_a_paired_shadow_interval_is_narrower_than_two_independent_groups():
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.random(n) < 0.3
    signal = y + rng.normal(0, 1.0, n)
    champion = pd.DataFrame({"request_id": np.arange(n).astype(str), "user_id": np.arange(n), "version": "1",
                             "outcome": y, "probability": 1 / (1 + np.exp(-signal))})  # fmt: skip
    shadow = champion.assign(version="2", probability=1 / (1 + np.exp(-(signal + rng.normal(0, 0.3, n)))))
    paired = stats.compare("probability", "roc_auc", champion, shadow, "shadow", 10, 300, 0)
    canary = shadow.assign(request_id=lambda f: "x" + f["request_id"])  # other requests: no pairs
    apart = stats.compare("probability", "roc_auc", champion, canary, "canary", 10, 300, 0)
    assert paired.paired and not apart.paired
    assert paired.difference.value == pytest.approx(apart.difference.value)
    expected = roc_auc_score(y, shadow["probability"]) - roc_auc_score(y, champion["probability"])
    assert paired.difference.value == pytest.approx(expected)
    assert paired.difference.lo <= expected <= paired.difference.hi
    assert (paired.difference.hi - paired.difference.lo) < 0.5 * (apart.difference.hi - apart.difference.lo)


def test_the_oracles_expected_roc_auc_is_the_mean_roc_auc_over_drawn_outcomes():
    rng = np.random.default_rng(1)
    p_true = rng.beta(1, 6, 400)
    scores = np.round(p_true + rng.normal(0, 0.05, 400), 2)  # noisy, with ties
    drawn = [roc_auc_score(rng.random(400) < p_true, scores) for _ in range(2000)]
    assert expected_roc_auc(scores, p_true) == pytest.approx(np.mean(drawn), abs=0.003)
    assert expected_roc_auc(p_true, p_true) > expected_roc_auc(scores, p_true)


def test_psi_and_ks_against_scipy_and_a_direct_computation():
    rng = np.random.default_rng(2)
    reference = rng.normal(0, 1, 5000)
    same = rng.normal(0, 1, 5000)
    shifted = rng.normal(0.5, 1, 5000)
    edges = np.quantile(reference, np.linspace(0, 1, 11))
    p = np.histogram(np.clip(reference, edges[0], edges[-1]), edges)[0] / 5000
    q = np.histogram(np.clip(shifted, edges[0], edges[-1]), edges)[0] / 5000
    assert stats.psi(reference, shifted) == pytest.approx(np.sum((q - p) * np.log(q / p)), rel=1e-9)
    assert stats.psi(reference, same) < 0.02 < 0.1 < stats.psi(reference, shifted)
    frame = lambda x: pd.DataFrame({"x": x, "history": [[0] * int(v > 0) for v in x], "name": "a"})  # noqa: E731
    (first, second) = stats.drift(frame(reference), frame(shifted), ["name", "history", "x"])
    assert first.feature == "x"  # the worst first; text is left out
    ks = scipy_stats.ks_2samp(reference, shifted)
    assert (first.ks, first.ks_p_value) == (pytest.approx(ks.statistic), pytest.approx(ks.pvalue))
    assert second.feature == "history"  # a list compares by its length: here 0 or 1, two values
    p, q = np.mean(reference > 0), np.mean(shifted > 0)
    assert second.psi == pytest.approx((q - p) * np.log(q / p) + (p - q) * np.log((1 - q) / (1 - p)))


def test_skew_finds_a_deliberately_broken_feature():
    served = pd.DataFrame(
        {
            "user_id": [1, 2, 3, 4],
            "as_of": [AS_OF] * 4,
            "features": [json.dumps({"n": n, "rate": n / 10, "seq": [n, 1], "gone": None}) for n in range(4)],
        }
    )
    offline = pd.DataFrame(
        {
            "n": [0, 1, 2, 3],
            "rate": np.array([0, 1, 2, 3], dtype=np.float32) / 10 * [1, 1, 1, 2],  # float32; one really off
            "seq": [np.array([n, 1]) for n in range(4)],
            "gone": [np.nan] * 4,
        }
    )
    found = {s.feature: s for s in skew.skew(served, offline)}
    assert found["rate"].mismatch_rate == 0.25 and found["rate"].example["user_id"] == 4
    assert found["n"].mismatch_rate == found["seq"].mismatch_rate == found["gone"].mismatch_rate == 0
    assert skew.skew(served, offline)[0].feature == "rate"


def test_alerts_are_one_line_per_breach():
    settings = load_settings(
        overrides={"monitoring.min_metrics.roc_auc": "0.7", "monitoring.max_metrics.ece": "0.05"}, environ={}
    ).settings
    metrics = {"roc_auc": stats.Estimate(0.65, 0.6, 0.7), "ece": stats.Estimate(0.02, 0.01, 0.03)}
    version = VersionReport("m", "3", "champion", 100, 90, 10, 0, metrics)
    task = TaskReport("purchase", "probability", "roc_auc", versions=[version])
    task.drift = [
        stats.FeatureDrift("n_pv_1d", 0.4, 0.2, 1e-9, 100, 100),
        stats.FeatureDrift("x", 0.01, 0.0, 1, 9, 9),
    ]
    task.skew = [skew.FeatureSkew("rate", 0.25, 200, None)]
    task.comparisons = [
        stats.Comparison("canary", "4", "3", "roc_auc", stats.Estimate(-0.08, -0.12, -0.04), False, 200),
        stats.Comparison("shadow", "5", "3", "roc_auc", stats.Estimate(-0.08, -0.2, 0.04), True, 100),
    ]
    lines = alerts(MonitorReport(None, None, AS_OF, [task]), settings)
    assert len(lines) == 4, lines
    assert "roc_auc 0.6500 is below 0.7" in lines[0]
    assert "canary v4 is worse than the champion v3" in lines[1]  # the shadow's interval holds 0: no alert
    assert "n_pv_1d drifted: PSI 0.400" in lines[2] and "rate is served unlike" in lines[3]
