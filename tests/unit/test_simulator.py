"""The behaviour simulator: Taobao's marginals, determinism, signal for every later model, its oracles,
atomic output, and going on from a saved simulation (--continue, --shift)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from shopsight.cli import app
from shopsight.data import (
    EventReader,
    SimulatorConfig,
    TimeWindow,
    continue_simulation,
    parse_shift,
    simulate,
)
from shopsight.data.schema import EVENT_SCHEMA, TAOBAO_BEHAVIOR_MIX
from shopsight.platform import ShopsightError

CFG = SimulatorConfig(users=2000, days=9, seed=0)
# The churn oracle's checks need more rows: 12 days give four disjoint 3-day windows after day 0.
CHURN_CFG = SimulatorConfig(users=6000, days=12, seed=0)


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


@pytest.fixture(scope="module")
def churn_sim(tmp_path_factory):
    """The churn oracle's rows, each with ``churned`` recomputed from the events (no event on the 3 next
    shop-local days), ``quiet_days`` (days since the user's last event, null before the first) and
    ``events`` (the user's events over the whole run: their activity level)."""
    out = tmp_path_factory.mktemp("churn") / "out"
    simulate(CHURN_CFG, out)
    events = ds.dataset(out / "events", partitioning="hive").to_table(columns=["user_id", "ts"]).to_pandas()
    oracle = pd.read_parquet(out / "truth" / "churn_3d.parquet")
    days = [CHURN_CFG.start + timedelta(days=d) for d in range(CHURN_CFG.days)]
    users = np.sort(oracle["user_id"].unique())
    local_day = events["ts"].dt.tz_convert(CHURN_CFG.timezone).dt.date
    per_day = pd.crosstab(events["user_id"], local_day).reindex(index=users, columns=days, fill_value=0)
    active = per_day.to_numpy() > 0
    row = np.searchsorted(users, oracle["user_id"].to_numpy())
    day = (pd.to_datetime(oracle["day"]) - pd.Timestamp(CHURN_CFG.start)).dt.days.to_numpy()
    oracle["day_index"] = day
    oracle["churned"] = ~active[row[:, None], day[:, None] + np.arange(1, 4)].any(axis=1)
    # days since the last active day on or before D: the first active day looking back from D
    back = day[:, None] - np.arange(CHURN_CFG.days)
    seen = active[row[:, None], back.clip(min=0)] & (back >= 0)
    oracle["quiet_days"] = np.where(seen.any(axis=1), seen.argmax(axis=1), np.nan)
    oracle["events"] = events["user_id"].value_counts().reindex(users, fill_value=0).to_numpy()[row]
    return oracle


def test_churn_oracle_is_calibrated_in_every_decile(churn_sim):
    """Within each decile of ``p_churn_3d``, the observed churn is within 3 standard errors of the mean p.

    Only snapshot days 0, 3, 6, 9 - ... are used: their 3-day windows are disjoint, so the residuals
    ``churned - p`` of a user's rows are uncorrelated (each p is the expectation given everything up to
    its day, which includes the earlier rows' outcomes) and the standard error of a decile's observed
    rate is exactly ``sqrt(sum p (1 - p)) / n``, the Poisson-binomial one. Overlapping windows would
    correlate the rows and make that error too small.
    """
    rows = churn_sim[churn_sim["day_index"] % 3 == 0]
    assert len(rows) == CHURN_CFG.users * 3  # days 0, 3, 6 (day 9 has no 3 simulated days after it)
    decile = pd.qcut(rows["p_churn_3d"], 10, labels=False)
    table = rows.assign(var=rows["p_churn_3d"] * (1 - rows["p_churn_3d"])).groupby(decile)
    mean_p, observed, n = table["p_churn_3d"].mean(), table["churned"].mean(), table.size()
    sigma = np.sqrt(table["var"].sum()) / n
    report = pd.DataFrame({"mean_p": mean_p, "observed": observed, "sigma": sigma, "n": n}).round(4)
    assert ((observed - mean_p).abs() <= 3 * sigma).all(), report.to_string()
    assert mean_p.iloc[0] < 0.02 and mean_p.iloc[-1] > 0.6, report.to_string()  # it separates users


def test_churn_base_rate_is_plausible_and_varies_across_users(churn_sim):
    rate = churn_sim["churned"].mean()
    assert 0.05 <= rate <= 0.40, rate
    assert churn_sim["p_churn_3d"].mean() == pytest.approx(rate, abs=0.01)
    per_user = churn_sim.groupby("user_id")["p_churn_3d"].mean()
    assert per_user.quantile(0.1) < rate / 2 and per_user.quantile(0.9) > 1.5 * rate, per_user.describe()


def test_churn_follows_quiet_days_beyond_a_low_activity(churn_sim):
    """Dormancy makes churn predictable from recency: among users of the same activity level, quiet days
    before D announce churn. In a memoryless Poisson world they would not (measured: -0.02 .. +0.004 there,
    a quartile's events having to fall on other days), so the comparison is a conservative one."""
    seen = churn_sim.dropna(subset=["quiet_days"])
    quartile = pd.qcut(seen["events"], 4, labels=False, duplicates="drop")
    for _, users in seen.groupby(quartile):
        after_active = users.loc[users["quiet_days"] == 0, "churned"].mean()
        after_quiet = users.loc[users["quiet_days"] >= 2, "churned"].mean()
        assert after_quiet > after_active + 0.05, (after_quiet, after_active)  # measured: +0.08 .. +0.11


def test_truth_files_keep_their_schema_and_rows(sim):
    result, _, truth = sim
    assert pa.parquet.read_schema(result.out / "truth" / "next_day_buy.parquet").names == [
        "user_id",
        "day",
        "p_buy_next_day",
        "bought_next_day",
    ]
    assert list(truth.dtypes.astype(str)) == ["int64", "object", "float64", "bool"]
    churn = pd.read_parquet(result.out / "truth" / "churn_3d.parquet")
    assert list(churn.columns) == ["user_id", "day", "p_churn_3d"]
    assert list(churn.dtypes.astype(str)) == ["int64", "object", "float64"]
    # a row for every user and every snapshot day whose 3 next days are simulated, and no other
    assert len(churn) == CFG.users * (CFG.days - 3)
    last = (CFG.start + timedelta(days=CFG.days - 4)).isoformat()
    assert churn["day"].min() == CFG.start.isoformat() and churn["day"].max() == last
    assert churn["p_churn_3d"].between(0, 1).all()


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

    events, truth, churn = next(iter_blocks(SimulatorConfig(users=50, days=2, seed=3)))
    assert events.schema == EVENT_SCHEMA
    assert truth.num_rows == 50
    assert churn.num_rows == 0 and churn.schema.names == ["user_id", "day", "p_churn_3d"]  # no D+3 in 2 days
    assert pa.compute.all(pa.compute.greater_equal(truth.column("p_buy_next_day"), 0)).as_py()


# -- going on: --continue and --shift -------------------------------------------------------------------

SMALL = SimulatorConfig(users=600, days=6, seed=3)  # two blocks of users


def _digest(out):
    """A digest of the events (in a fixed order) and of both oracles."""
    table = _sorted(out)
    digest = hashlib.sha256()
    for name in ("user_id", "item_id", "category_id"):
        digest.update(table.column(name).to_numpy().astype("<i8").tobytes())
    digest.update("\n".join(table.column("behavior").to_pylist()).encode())
    digest.update(table.column("ts").cast(pa.int64()).to_numpy().astype("<i8").tobytes())
    for name in ("next_day_buy", "churn_3d"):
        truth = pd.read_parquet(out / "truth" / f"{name}.parquet").sort_values(["day", "user_id"])
        digest.update(truth.to_csv(index=False, float_format="%.12g").encode())
    return digest.hexdigest()


def test_a_fresh_run_draws_as_it_always_did(tmp_path):
    """Saving the state for a continuation must not move a single draw of a fresh run: recorded numbers
    elsewhere depend on them. The digest was computed with this function on the simulator as it was before
    it saved any state (users=600, days=6, seed=3)."""
    simulate(SMALL, tmp_path / "out")
    assert _digest(tmp_path / "out") == "13ccfff85bf00046f2bf4bc40c2532f485375fba44b8b938416cd23f5f26ab8e"
    assert sorted(p.name for p in (tmp_path / "out" / "state").iterdir()) == [
        "block-00000.npz",
        "block-00001.npz",
    ]


def _files(folder):
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_ino)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _day_files(out, days):
    return {k: v for k, v in _files(out / "events").items() if k.split("/")[0] in {f"day={d}" for d in days}}


def _events_of(out, day):
    return ds.dataset(out / "events" / f"day={day}").to_table().to_pandas()


def _sorted_events(out, day):
    return _events_of(out, day).sort_values(["user_id", "ts", "item_id", "behavior"]).reset_index(drop=True)


def _names(cfg, first, last):
    return [(cfg.start + timedelta(days=d)).isoformat() for d in range(first, last)]


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    """SMALL simulated, its files noted, then continued by 2 days."""
    out = tmp_path_factory.mktemp("continued") / "out"
    simulate(SMALL, out)
    before = {
        "events": _files(out / "events"),
        "truth": pd.read_parquet(out / "truth" / "next_day_buy.parquet"),
        "churn": pd.read_parquet(out / "truth" / "churn_3d.parquet"),
    }
    result = continue_simulation(out, 2)
    return out, before, result


def test_continuing_keeps_the_old_days_and_adds_new_ones_of_the_same_world(continued):
    from shopsight.data._simulator import _World

    out, before, result = continued
    old, new = _names(SMALL, 0, 6), _names(SMALL, 6, 8)
    assert result.days == new and result.users == SMALL.users and result.events > 0
    # the old days' files are the same files: hard links, byte for byte
    assert _day_files(out, old) == before["events"]
    assert all((out / "events" / f"day={day}").is_dir() for day in new)
    events = ds.dataset(out / "events", partitioning="hive").to_table().to_pandas()
    fresh = events[events["day"].isin(new)]
    assert len(fresh) == result.events
    assert set(fresh["user_id"]) <= set(range(1, SMALL.users + 1))
    assert set(fresh["item_id"]) <= set(_World(SMALL).item_ids.tolist())
    # an item keeps its category
    categories = events.groupby("item_id")["category_id"].nunique()
    assert (categories == 1).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["days"] == old + new and manifest["config"]["days"] == 8
    assert manifest["events"] == len(events)
    assert sum(manifest["behavior_counts"].values()) == len(events)
    (continuation,) = manifest["continuations"]
    assert (
        continuation["days"] == new
        and continuation["shift"] == {}
        and continuation["events"] == result.events
    )


def test_continuing_adds_the_oracle_rows_that_the_new_days_complete(continued):
    out, before, _ = continued
    truth = pd.read_parquet(out / "truth" / "next_day_buy.parquet")
    churn = pd.read_parquet(out / "truth" / "churn_3d.parquet")
    # next day: the previously last day (day 5) and the first new day (day 6) gain rows; day 7 has no next
    assert sorted(truth["day"].unique()) == _names(SMALL, 0, 7)
    assert truth.groupby("day").size().eq(SMALL.users).all()
    # churn: days 3 and 4 now have their 3 next days simulated
    assert sorted(churn["day"].unique()) == _names(SMALL, 0, 5)
    assert churn.groupby("day").size().eq(SMALL.users).all()
    # the old rows stay as they were
    old_truth = truth[truth["day"] < "2017-11-30"].sort_values(["day", "user_id"]).reset_index(drop=True)
    assert old_truth.equals(before["truth"].sort_values(["day", "user_id"]).reset_index(drop=True))
    old_churn = churn[churn["day"] < "2017-11-28"].sort_values(["day", "user_id"]).reset_index(drop=True)
    assert old_churn.equals(before["churn"].sort_values(["day", "user_id"]).reset_index(drop=True))
    # the labels of the new rows agree with the new events
    new = truth[truth["day"] >= "2017-11-30"]
    buys = ds.dataset(out / "events", partitioning="hive").to_table().to_pandas().query("behavior == 'buy'")
    bought = set(zip(buys["user_id"], buys["day"].astype(str), strict=True))
    next_day = (pd.to_datetime(new["day"]) + pd.Timedelta(days=1)).dt.strftime("%Y-%m-%d")
    observed = [(u, d) in bought for u, d in zip(new["user_id"], next_day, strict=True)]
    assert observed == new["bought_next_day"].tolist()


def test_continuing_is_deterministic_and_does_not_depend_on_how_it_is_split(continued, tmp_path):
    """The continuation goes on day by day from the saved state, so 2 days at once and 1 day twice are the
    same draws."""
    out, _, _ = continued
    new = _names(SMALL, 6, 8)
    for name, steps in (("again", [2]), ("split", [1, 1])):
        simulate(SMALL, tmp_path / name)
        for days in steps:
            continue_simulation(tmp_path / name, days)
        for day in new:
            assert _sorted_events(tmp_path / name, day).equals(_sorted_events(out, day))
        assert _digest(tmp_path / name) == _digest(out)
    assert len(json.loads((tmp_path / "split" / "manifest.json").read_text())["continuations"]) == 2


@pytest.fixture(scope="module")
def went_on(tmp_path_factory):
    """4,000 users over 6 days, each user's hidden state at the end noted, then 2 days more; and the same
    simulation continued with a shift of the funnel and of dormancy."""
    cfg = SimulatorConfig(users=4000, days=6, seed=11)
    out, shifted = (tmp_path_factory.mktemp(name) / "out" for name in ("went_on", "shifted"))
    simulate(cfg, out)
    shutil.copytree(out, shifted)
    dormant = {}
    for path in sorted((out / "state").glob("block-*.npz")):
        with np.load(path) as saved:
            dormant.update(zip(saved["user_ids"].tolist(), saved["dormant"][:, -1].tolist(), strict=True))
    continue_simulation(out, 2)
    continue_simulation(shifted, 2, {"intent_bias": -0.6, "p_return": 0.5, "dormant_activity": 0.2})
    return cfg, out, shifted, pd.Series(dormant)


def test_the_new_days_go_on_from_the_hidden_state_of_the_last_one(went_on):
    """Users dormant at the end of the saved days are far less often seen on the first new day than active
    ones; a continuation started afresh from the chain's stationary law would see both groups alike."""
    _, out, _, dormant = went_on
    seen = dormant.index.isin(_events_of(out, "2017-12-01")["user_id"].unique())
    asleep, awake = seen[dormant.to_numpy()].mean(), seen[~dormant.to_numpy()].mean()
    assert dormant.sum() > 400  # enough dormant users for the comparison (measured: 828)
    assert asleep < 0.4 * awake, (asleep, awake)  # measured: 0.15 vs 0.57


def _calibration(out, days):
    """(mean p, observed rate, standard error) of the next-day oracle over snapshot ``days``. A user's rows
    on consecutive days do not correlate their residuals (each p is the expectation given everything up to
    its day, the earlier outcome included), so the Poisson-binomial error is the right one."""
    truth = pd.read_parquet(out / "truth" / "next_day_buy.parquet")
    rows = truth[truth["day"].isin(days)]
    p = rows["p_buy_next_day"]
    return p.mean(), rows["bought_next_day"].mean(), np.sqrt((p * (1 - p)).sum()) / len(rows)


def test_the_oracle_is_calibrated_on_the_new_days_shifted_or_not(went_on):
    cfg, out, shifted, _ = went_on
    snapshots = _names(cfg, 5, 7)  # whose next day is a new day
    mean_p, observed, sigma = _calibration(out, snapshots)
    assert abs(observed - mean_p) <= 3 * sigma, (mean_p, observed, sigma)  # measured: 0.5 sigma
    shifted_p, shifted_observed, shifted_sigma = _calibration(shifted, snapshots)
    assert abs(shifted_observed - shifted_p) <= 3 * shifted_sigma, (
        shifted_p,
        shifted_observed,
        shifted_sigma,
    )
    # the shift moves behaviour far beyond the error, so an oracle that ignored it would fail above
    assert shifted_observed - mean_p > 10 * shifted_sigma, (shifted_observed, mean_p)
    manifest = json.loads((shifted / "manifest.json").read_text())
    assert manifest["shifts"] == {
        day: {"intent_bias": -0.6, "p_return": 0.5, "dormant_activity": 0.2} for day in _names(cfg, 6, 8)
    }


def _cart_share(out, day):
    behavior = _events_of(out, day)["behavior"]
    return (behavior == "cart").sum() / (behavior == "pv").sum()


def test_a_shift_changes_the_shifted_days_only(tmp_path):
    plain, shifted = tmp_path / "plain", tmp_path / "shifted"
    simulate(SMALL, plain)
    continue_simulation(plain, 1)
    continue_simulation(plain, 1)
    simulate(SMALL, shifted)
    continue_simulation(shifted, 1)
    continue_simulation(shifted, 1, parse_shift([f"p_cart={3 * SMALL.p_cart}"]))
    days = _names(SMALL, 0, 8)
    # before the shift, the same draws (the continuation's days included)
    assert _day_files(shifted, days[:7]).keys() == _day_files(plain, days[:7]).keys()
    for day in days[:7]:
        assert _events_of(shifted, day).equals(_events_of(plain, day))
        assert _cart_share(shifted, day) < 0.09
    assert 2.5 < _cart_share(shifted, days[7]) / _cart_share(plain, days[7]) < 3.5
    manifest = json.loads((shifted / "manifest.json").read_text())
    assert manifest["shifts"] == {days[7]: {"p_cart": 3 * SMALL.p_cart}}
    assert [c["shift"] for c in manifest["continuations"]] == [{}, {"p_cart": 3 * SMALL.p_cart}]


@pytest.mark.parametrize(
    "items,message",
    [
        (["p_kart=0.1"], "shift p_kart: no such constant; these can be shifted: mean_session_views"),
        (["activity_sigma=2"], "shift activity_sigma: fixed for the whole simulation"),
        (["users=5"], "shift users: fixed"),
        (["p_cart=1.5"], r"shift p_cart: 1.5 is out of range \[0, 1\]"),
        (["p_cart=lots"], "shift p_cart: 'lots' is not a number"),
        (["mean_session_views=nan"], "shift mean_session_views: nan is out of range"),
        (["open_item_days=2.5"], "shift open_item_days: 2.5 is not a whole number"),
        (["p_cart"], "expected KEY=VALUE"),
        (["p_cart=0.1", "p_cart=0.2"], "given twice"),
    ],
)
def test_a_bad_shift_is_refused_naming_the_key(items, message):
    with pytest.raises(ShopsightError, match=message):
        parse_shift(items)


def test_shifted_constants_must_fit_together_and_nothing_is_written_otherwise(tmp_path):
    out = tmp_path / "out"
    simulate(SimulatorConfig(users=50, days=2, seed=1), out)
    before = _files(out)
    with pytest.raises(ShopsightError, match="p_related \\+ p_repeat \\+ p_same_category would be 1.3"):
        continue_simulation(out, 1, {"p_related": 0.98})
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_without_saved_state_or_no_simulation_is_refused(tmp_path):
    out = tmp_path / "out"
    simulate(SimulatorConfig(users=50, days=2, seed=1), out)
    shutil.rmtree(out / "state")  # as written before simulations saved their state
    with pytest.raises(ShopsightError, match="has no saved state to go on from .* simulate it again"):
        continue_simulation(out, 1)
    (tmp_path / "notes").mkdir()
    with pytest.raises(ShopsightError, match="notes is not a simulation"):
        continue_simulation(tmp_path / "notes", 1)
    with pytest.raises(ShopsightError, match="missing is not a simulation"):
        continue_simulation(tmp_path / "missing", 1)


def test_an_interrupted_continuation_leaves_the_simulation_as_it_was(tmp_path):
    out = tmp_path / "out"
    simulate(SMALL, out)
    before = _files(out)

    def killed(done, total):
        if done < total:
            raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        continue_simulation(out, 2, on_progress=killed)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    continue_simulation(out, 2)  # and it can still go on
    assert json.loads((out / "manifest.json").read_text())["config"]["days"] == 8


runner = CliRunner()


def test_the_command_goes_on_and_refuses_what_the_saved_simulation_decides(tmp_path):
    command = ["--data-dir", str(tmp_path / "dd"), "data", "simulate"]
    first = runner.invoke(app, [*command, "--users", "300", "--days", "3"])
    assert first.exit_code == 0, first.output
    went_on = runner.invoke(app, [*command, "--continue", "2", "--shift", "p_cart=0.1"])
    assert went_on.exit_code == 0, went_on.output
    summary = _normalised(went_on.output)
    assert "Continued" in summary and "days added 2 (2017-11-28 .. 2017-11-29)" in summary
    assert "shift p_cart=0.1" in summary and "events/s" in summary
    events = tmp_path / "dd" / "simulated" / "events"
    assert sorted(p.name for p in events.iterdir())[-2:] == ["day=2017-11-28", "day=2017-11-29"]

    refused = runner.invoke(app, [*command, "--continue", "1", "--users", "5"])
    assert refused.exit_code == 2
    assert "Invalid value for --users: cannot be given with --continue" in _normalised(refused.output)
    alone = runner.invoke(app, [*command, "--shift", "p_cart=0.1"])
    assert alone.exit_code == 2 and "only with --continue" in _normalised(alone.output)
    bad = runner.invoke(app, [*command, "--continue", "1", "--shift", "seed=4"])
    assert bad.exit_code == 2 and "shift seed: fixed for the whole simulation" in _normalised(bad.output)
    assert len(list(events.iterdir())) == 5  # the refusals wrote nothing


def _normalised(text):
    """Rich's boxes and wrapping as one line of single spaces."""
    return " ".join(re.sub(r"[│╭╮╰╯─┌┐└┘├┤┬┴┼]", " ", text).split())
