"""The behaviour simulator: Taobao's marginals, determinism, signal for every later model, atomic output."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from sklearn.metrics import roc_auc_score

from shopsight.data import EventReader, SimulatorConfig, TimeWindow, simulate
from shopsight.data.schema import EVENT_SCHEMA, TAOBAO_BEHAVIOR_MIX
from shopsight.platform import ShopsightError

CFG = SimulatorConfig(users=2000, days=9, seed=0)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "out"
    result = simulate(CFG, out)
    events = ds.dataset(out / "events", partitioning="hive").to_table().to_pandas()
    truth = pd.read_parquet(out / "truth" / "next_day_buy.parquet")
    return result, events, truth


def test_behaviour_mix_within_half_a_point_of_taobao(sim):
    result, events, _ = sim
    mix = events["behavior"].value_counts(normalize=True) * 100
    for behavior, target in TAOBAO_BEHAVIOR_MIX.items():
        assert abs(mix[behavior] - target) <= 0.5, (behavior, mix[behavior])
        assert result.behavior_mix[behavior] == pytest.approx(mix[behavior])
    assert result.events == len(events)


def test_heavy_tailed_activity_and_buyers(sim):
    _, events, _ = sim
    per_user = events.groupby("user_id").size()
    assert 45 <= per_user.median() <= 75  # Taobao: about 60 in 9 days
    assert per_user.quantile(0.99) > 6 * per_user.median()  # a long tail
    assert per_user.mean() > 1.3 * per_user.median()
    buyers = events.loc[events.behavior == "buy", "user_id"].nunique() / CFG.users
    assert 0.58 <= buyers <= 0.75  # about two thirds


def test_items_zipf_like_and_categories_uneven(sim):
    _, events, _ = sim
    views = events[events.behavior == "pv"]
    counts = views["item_id"].value_counts().to_numpy()
    top_1pct = counts[: max(1, len(counts) // 100)].sum() / counts.sum()
    assert top_1pct > 0.08  # a uniform law would give 0.01
    # log-log slope of the rank-frequency curve over the head is Zipf-like
    ranks = np.arange(1, 201)
    slope = np.polyfit(np.log(ranks), np.log(counts[:200]), 1)[0]
    assert -1.6 < slope < -0.4, slope
    sizes = events.groupby("category_id")["item_id"].nunique().sort_values(ascending=False)
    assert sizes.iloc[0] > 5 * sizes.median()


def test_daily_rhythm_peaks_in_the_evening(sim):
    _, events, _ = sim
    hour = events["ts"].dt.tz_convert("Asia/Shanghai").dt.hour
    share = hour.value_counts(normalize=True).reindex(range(24), fill_value=0.0)
    assert share.idxmax() in (20, 21, 22)
    assert share.loc[19:22].sum() > 3 * share.loc[2:5].sum()


def _next_view_pairs(events):
    views = events[events.behavior == "pv"].sort_values(["user_id", "ts"], kind="stable")
    nxt = views.groupby("user_id").shift(-1)
    same_session = (nxt["ts"] - views["ts"]) < pd.Timedelta(minutes=30)
    pairs = pd.DataFrame({"cur": views["item_id"], "next": nxt["item_id"], "day": views["ts"].dt.day})
    return pairs[same_session & (pairs["cur"] != pairs["next"])]


def test_item_transitions_beat_popularity(sim):
    """A first-order transition table, fitted on the first days, predicts the next view far better."""
    _, events, _ = sim
    pairs = _next_view_pairs(events)
    last_day = pairs["day"].max()
    train, test = pairs[pairs["day"] != last_day], pairs[pairs["day"] == last_day]
    popular = train["next"].value_counts().index[:10]
    transitions = (
        train.groupby(["cur", "next"])
        .size()
        .rename("n")
        .reset_index()
        .sort_values(["cur", "n"], ascending=[True, False])
    )
    top_next = transitions.groupby("cur")["next"].apply(lambda s: list(s[:10])).to_dict()

    def hit(row):
        return row.next in top_next.get(row.cur, popular)

    hr_transition = np.mean([hit(r) for r in test.itertuples()])
    hr_popular = test["next"].isin(popular).mean()
    assert hr_transition > 3 * hr_popular, (hr_transition, hr_popular)


def test_carted_items_are_bought_more_often_than_merely_viewed_ones(sim):
    _, events, _ = sim
    first = events.sort_values("ts").groupby(["user_id", "item_id", "behavior"])["ts"].min().unstack()
    bought_later = first["buy"].notna() & (
        first["buy"] > first["cart"].fillna(pd.Timestamp.max.tz_localize("UTC"))
    )
    carted = first["cart"].notna()
    viewed_only = first["pv"].notna() & first["cart"].isna() & first["fav"].isna()
    p_after_cart = (first["buy"].notna() & carted & (first["buy"] > first["cart"]))[carted].mean()
    p_viewed = first["buy"].notna()[viewed_only].mean()
    assert p_after_cart > 5 * p_viewed, (p_after_cart, p_viewed)
    assert bought_later.sum() > 0


def test_oracle_is_calibrated_and_predictive(sim):
    _, events, truth = sim
    assert len(truth) == CFG.users * (CFG.days - 1)
    auc = roc_auc_score(truth["bought_next_day"], truth["p_buy_next_day"])
    assert auc > 0.72, auc
    assert truth["p_buy_next_day"].mean() == pytest.approx(truth["bought_next_day"].mean(), abs=0.02)
    # the truth's labels agree with the events: a user "bought on D+1" iff a buy event is dated D+1
    buys = events[events.behavior == "buy"]
    buy_days = set(
        zip(buys["user_id"], buys["ts"].dt.tz_convert("Asia/Shanghai").dt.strftime("%Y-%m-%d"), strict=True)
    )
    next_day = (pd.to_datetime(truth["day"]) + pd.Timedelta(days=1)).dt.strftime("%Y-%m-%d")
    observed = [(u, d) in buy_days for u, d in zip(truth["user_id"], next_day, strict=True)]
    assert observed == truth["bought_next_day"].tolist()


def test_events_fit_the_contract_and_the_window(sim, tmp_path):
    result, _, _ = sim
    window = TimeWindow.from_days(CFG.start, CFG.start + timedelta(days=CFG.days - 1), CFG.timezone)
    reader = EventReader(result.out / "events", window=window, quarantine=tmp_path / "q.csv")
    assert reader.read_all().schema == EVENT_SCHEMA
    assert reader.report.rows_rejected == 0
    assert result.days == [f"2017-11-{d}" for d in range(25, 31)] + ["2017-12-01", "2017-12-02", "2017-12-03"]
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["events"] == result.events and manifest["config"]["seed"] == 0


def _sorted(path):
    table = ds.dataset(path / "events", partitioning="hive").to_table(columns=list(EVENT_SCHEMA.names))
    return table.sort_by([(c, "ascending") for c in ("user_id", "ts", "item_id", "behavior")])


def test_same_seed_same_events_whatever_the_buffer(tmp_path):
    cfg = SimulatorConfig(users=700, days=3, seed=42)
    a = simulate(cfg, tmp_path / "a")
    b = simulate(cfg, tmp_path / "b", flush_rows=5_000)
    c = simulate(replace(cfg, seed=43), tmp_path / "c")
    assert b.files > a.files  # smaller buffers, more files: memory is bounded by the buffer
    assert _sorted(tmp_path / "a").equals(_sorted(tmp_path / "b"))
    assert not _sorted(tmp_path / "a").equals(_sorted(tmp_path / "c"))
    assert a.events != c.events


def test_output_is_replaced_atomically_and_a_failure_leaves_the_old_one(tmp_path):
    out = tmp_path / "out"
    first = simulate(SimulatorConfig(users=600, days=2, seed=1), out)
    before = _sorted(out)

    def boom(done, total):
        if done > 500:
            raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        simulate(SimulatorConfig(users=600, days=2, seed=2), out, on_progress=boom)
    assert _sorted(out).equals(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind

    second = simulate(SimulatorConfig(users=600, days=2, seed=2), out)
    assert second.events != first.events and not _sorted(out).equals(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ShopsightError, match="not written by shopsight"):
        simulate(SimulatorConfig(users=10, days=2), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_events_table_schema_of_a_block():
    from shopsight.data._simulator import iter_blocks

    events, truth = next(iter_blocks(SimulatorConfig(users=50, days=2, seed=3)))
    assert events.schema == EVENT_SCHEMA
    assert truth.num_rows == 50
    assert pa.compute.all(pa.compute.greater_equal(truth.column("p_buy_next_day"), 0)).as_py()
