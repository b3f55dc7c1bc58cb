"""The GAN and the synthetic-data metrics: metrics against hand-computed cases, a short fit that learns,
rows in the fitted schema, save/load, and clear errors."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from shopsight.platform import ShopsightError
from shopsight.training.models import MODELS, build_model
from shopsight.training.models.gan import GANConfig, TabularGAN
from shopsight.training.synthetic_users.evaluate import (
    column_distances,
    correlation_difference,
    distance_to_closest_record,
    synthetic_report,
    total_variation_distance,
    tstr_ratio,
)

NUMERIC = ["views", "spend", "days"]
CATEGORICAL = ["device"]


def _users(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Heavy-tailed counts, a float amount, a bounded int, a category; buyers view more."""
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.0, n)
    views = rng.poisson(3 * activity).astype(np.int64)
    return pd.DataFrame(
        {
            "views": views,
            "spend": np.round(rng.lognormal(3.0, 0.8, n), 2),
            "device": rng.choice(["app", "web", "tablet"], n, p=[0.6, 0.3, 0.1]),
            "days": np.minimum(7, rng.poisson(2 * activity)).astype(np.int32),
            "buy": rng.random(n) < 1 / (1 + np.exp(-(np.log1p(views) - 2))),
        }
    )


def _small_config(**overrides) -> GANConfig:
    values = dict(
        epochs=40,
        batch_size=50,
        noise_dim=16,
        generator_hidden=(64, 64),
        critic_hidden=(64, 64),
        n_critic=3,
        lr_generator=1e-3,
        lr_critic=1e-3,
    )
    return GANConfig(**(values | overrides))


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    frame = _users()
    gan = TabularGAN(_small_config())
    lines: list[str] = []
    history = gan.fit(frame, "buy", numeric=NUMERIC, categorical=CATEGORICAL, log=lines.append)
    return frame, gan, history, lines


# ----- metrics by hand ------------------------------------------------------------------------------


def test_total_variation_and_column_distances_by_hand():
    assert total_variation_distance(list("aabb"), list("abbb")) == pytest.approx(0.25)
    assert total_variation_distance(list("aa"), list("bb")) == 1.0
    real = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "c": list("aabb")})
    synthetic = pd.DataFrame({"x": [3.0, 4.0, 5.0, 6.0], "c": list("abbb")})
    distances = column_distances(real, synthetic, ["x"], ["c"])
    # empirical CDFs: at 2 the real one is 0.5, the synthetic one 0
    assert distances["x"]["ks"] == pytest.approx(0.5)
    # every quantile moves by 2, in real standard deviations (population std of 1..4 = sqrt(1.25))
    assert distances["x"]["wasserstein"] == pytest.approx(2 / math.sqrt(1.25))
    assert distances["c"]["tvd"] == pytest.approx(0.25)
    assert distances["mean"] == {
        "ks": pytest.approx(0.5),
        "wasserstein": pytest.approx(2 / math.sqrt(1.25)),
        "tvd": pytest.approx(0.25),
    }
    same = column_distances(real, real, ["x"], ["c"])
    assert same["x"] == {"ks": 0.0, "wasserstein": 0.0} and same["c"]["tvd"] == 0.0


def test_correlation_difference_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    real = pd.DataFrame({"a": x, "b": 2 * x, "c": [1.0, -1.0, -1.0, 1.0]})  # corr(a, b) = 1, (a, c) = 0
    synthetic = pd.DataFrame({"a": x, "b": -x, "c": [5.0, 5.0, 5.0, 5.0]})  # corr(a, b) = -1; c constant
    result = correlation_difference(real, synthetic, ["a", "b", "c"])
    # pairs (a, b): |1 - -1| = 2; (a, c): |0 - 0| = 0; (b, c): 0 (constant columns count as 0)
    assert result["max_abs"] == pytest.approx(2.0)
    assert result["mean_abs"] == pytest.approx(2 / 3)
    assert correlation_difference(real, real, ["a", "b"]) == {"mean_abs": 0.0, "max_abs": 0.0}
    with pytest.raises(ShopsightError, match="at least two numeric columns"):
        correlation_difference(real, real, ["a"])


def test_distance_to_closest_record_by_hand():
    # train x: 0, 2 -> mean 1, std 1; so a z-score distance equals the raw distance
    train = pd.DataFrame({"x": [0.0, 2.0], "c": ["a", "b"]})
    synthetic = pd.DataFrame({"x": [0.0, 2.5, 1.0], "c": ["a", "b", "b"]})
    holdout = pd.DataFrame({"x": [0.5, 4.0, 2.0], "c": ["a", "b", "a"]})
    result = distance_to_closest_record(train, synthetic, holdout, ["x"], ["c"], max_rows=None)
    # synthetic: (0, a) copies a row: 0; (2.5, b) -> (2, b): 0.5; (1, b) -> (2, b): 1
    assert result["synthetic_median"] == pytest.approx(0.5)
    assert result["synthetic_exact_share"] == pytest.approx(1 / 3)
    # holdout: (0.5, a) -> 0.5; (4, b) -> 2; (2, a) -> (2, b): a category mismatch weighs 1
    assert result["holdout_median"] == pytest.approx(1.0)
    assert result["median_ratio"] == pytest.approx(0.5)
    assert result["synthetic_p05"] == pytest.approx(np.percentile([0, 0.5, 1], 5))
    assert result["holdout_exact_share"] == 0.0 and result["rows"] == 3


def test_tstr_ratio_is_one_when_synthetic_is_real_train():
    frame = _users(600, seed=1)
    train, test = frame.iloc[:400], frame.iloc[400:]
    result = tstr_ratio(train, train, test, "buy", [*NUMERIC, *CATEGORICAL], categorical=CATEGORICAL)
    assert result["ratio"] == 1.0
    assert result["tstr_auc"] == result["trtr_auc"] > 0.6  # buyers view more: the classifier sees it
    # labels that say nothing: the synthetic-trained classifier is no better than chance
    noise = train.assign(buy=np.random.default_rng(0).random(len(train)) < 0.4)
    worse = tstr_ratio(train, noise, test, "buy", NUMERIC)
    assert worse["tstr_auc"] < 0.6 and worse["ratio"] < 0.95
    with pytest.raises(ShopsightError, match="only one class"):
        tstr_ratio(train, train.assign(buy=True), test, "buy", NUMERIC)
    with pytest.raises(ShopsightError, match="lacks column"):
        tstr_ratio(train, train.drop(columns="views"), test, "buy", NUMERIC)


# ----- the GAN ----------------------------------------------------------------------------------


def test_gan_is_registered_and_config_checked():
    assert MODELS["gan"][2] == "TabularGAN"
    gan = build_model("gan", epochs=2, batch_size=40, pac=4)
    assert isinstance(gan, TabularGAN) and gan.cfg.epochs == 2 and gan.cfg.gp_weight == 10.0
    with pytest.raises(ShopsightError, match="bad configuration for gan.*multiple of pac"):
        build_model("gan", batch_size=50, pac=3)


def test_fit_learns(fitted):
    frame, gan, history, lines = fitted
    assert len(history) == 40 and len(lines) == 40
    assert lines[0].startswith("gan epoch 1/40  critic ") and "wasserstein" in lines[0]
    for entry in history:
        assert all(math.isfinite(entry[k]) for k in ("critic_loss", "generator_loss", "wasserstein"))
    wasserstein = [h["wasserstein"] for h in history]
    # the critic first learns to tell fakes apart, then the generator closes the gap
    assert np.mean(wasserstein[-5:]) < 0.5 * max(wasserstein[:10])
    # and the rows come closer to the real ones than after one epoch
    early = TabularGAN(_small_config(epochs=1))
    early.fit(frame, "buy", numeric=NUMERIC, categorical=CATEGORICAL, log=None)
    before = column_distances(frame, early.sample(1000, seed=0), NUMERIC, CATEGORICAL)["mean"]
    after = column_distances(frame, gan.sample(1000, seed=0), NUMERIC, CATEGORICAL)["mean"]
    assert after["ks"] < 0.6 * before["ks"] and after["ks"] < 0.2 and after["tvd"] < 0.1


def test_samples_follow_the_schema_and_the_condition(fitted):
    frame, gan, _, _ = fitted
    rows = gan.sample(500, seed=3)
    assert list(rows.columns) == list(frame.columns) and len(rows) == 500
    assert rows.dtypes.to_dict() == frame.dtypes.to_dict()
    assert (rows.views >= 0).all() and rows.days.between(0, 7).all()
    assert rows.spend.between(frame.spend.min(), frame.spend.max()).all()
    assert set(rows.device) <= set(frame.device)
    assert 0.2 < rows.buy.mean() < 0.6  # drawn at the training ratio (0.40) without a condition
    buyers, others = gan.sample(1000, True, seed=4), gan.sample(1000, False, seed=4)
    assert buyers.buy.all() and not others.buy.any()
    assert buyers.views.mean() > others.views.mean()  # as in the real rows: buyers view more
    assert gan.sample(4, [True, False, True, True], seed=0).buy.tolist() == [True, False, True, True]
    assert gan.sample(0).shape == (0, 5)
    pd.testing.assert_frame_equal(gan.sample(50, seed=9), gan.sample(50, seed=9))


def test_save_and_load_sample_the_same(fitted, tmp_path):
    frame, gan, _, _ = fitted
    path = gan.save(tmp_path / "gan.pt")
    loaded = TabularGAN.load(path)
    assert loaded.cfg == gan.cfg
    pd.testing.assert_frame_equal(loaded.sample(100, True, seed=1), gan.sample(100, True, seed=1))


def test_category_dtype_and_report_on_gan_rows(fitted):
    frame, gan, _, _ = fitted
    synthetic = gan.sample(300, seed=5)
    report = synthetic_report(frame, synthetic, _users(200, seed=7), "buy", NUMERIC, CATEGORICAL)
    assert set(report) == {"tstr", "columns", "correlation", "dcr"}
    assert 0.0 < report["tstr"]["ratio"] < 1.5 and report["dcr"]["rows"] == 200
    typed = frame.assign(device=frame.device.astype("category"))
    small = TabularGAN(_small_config(epochs=1))
    small.fit(typed, "buy", numeric=["views"], categorical=["device"], log=None)
    rows = small.sample(20, seed=0)
    assert isinstance(rows.device.dtype, pd.CategoricalDtype)
    assert list(rows.device.cat.categories) == list(typed.device.cat.categories)
    assert list(rows.columns) == ["views", "device", "buy"]


def test_clear_errors():
    frame = _users(60)
    gan = TabularGAN(_small_config(epochs=1))
    fit = dict(numeric=NUMERIC, categorical=CATEGORICAL, log=None)
    with pytest.raises(ShopsightError, match="not fitted"):
        gan.sample(3)
    with pytest.raises(ShopsightError, match="empty frame"):
        gan.fit(frame.iloc[:0], "buy", **fit)
    with pytest.raises(ShopsightError, match="lacks column.*'nope'"):
        gan.fit(frame, "buy", numeric=["views", "nope"], log=None)
    with pytest.raises(ShopsightError, match="'days' must have exactly two values, found 8"):
        gan.fit(frame, "days", numeric=["views"], log=None)
    with pytest.raises(ShopsightError, match="exactly two values, found 1"):
        gan.fit(frame.assign(buy=True), "buy", **fit)
    with pytest.raises(ShopsightError, match="'device' has dtype object; list it as categorical"):
        gan.fit(frame, "buy", numeric=["views", "device"], log=None)
    with pytest.raises(ShopsightError, match="'device' has 1 missing values"):
        gan.fit(frame.assign(device=frame.device.where(frame.index != 3)), "buy", **fit)
    with pytest.raises(ShopsightError, match="'spend' has no values, only missing ones"):
        gan.fit(frame.assign(spend=np.nan), "buy", **fit)
    gan.fit(frame, "buy", **fit)
    with pytest.raises(ShopsightError, match="unknown condition 'yes'"):
        gan.sample(3, "yes")
    with pytest.raises(ShopsightError, match="non-negative integer"):
        gan.sample(-1)


def test_missing_numeric_values_are_learned_and_sampled_as_missing():
    """Hours since the last purchase are missing for users who never bought: mostly the non-buyers."""
    frame = _users(400, seed=1)
    never = np.random.default_rng(0).random(len(frame)) < np.where(frame.buy, 0.1, 0.8)
    frame["hours_since_buy"] = np.where(never, np.nan, np.round(frame.spend % 48, 1))
    frame["coupons"] = pd.array(np.where(never, None, frame.views % 3), dtype="Int64")
    numeric = [*NUMERIC, "hours_since_buy", "coupons"]
    gan = TabularGAN(_small_config(epochs=30))
    gan.fit(frame, "buy", numeric=numeric, categorical=CATEGORICAL, log=None)
    buyers, others = gan.sample(1000, True, seed=0), gan.sample(1000, False, seed=0)
    assert list(buyers.columns) == list(frame.columns)  # no indicator column comes out
    assert buyers.coupons.dtype == "Int64" and buyers.hours_since_buy.dtype == np.float64
    # the missing share follows the condition, as in the real rows (0.1 vs 0.8)
    assert buyers.hours_since_buy.isna().mean() < 0.35 < 0.55 < others.hours_since_buy.isna().mean()
    assert (buyers.hours_since_buy.isna() == buyers.coupons.isna()).mean() > 0.8  # missing together
    present = others.hours_since_buy.dropna()
    assert present.between(frame.hours_since_buy.min(), frame.hours_since_buy.max()).all()
    # the metrics take missing values: their share is a column of its own
    distances = column_distances(frame, gan.sample(1000, seed=1), numeric, CATEGORICAL)
    assert distances["hours_since_buy is missing"]["tvd"] < 0.1
    report = synthetic_report(
        frame,
        gan.sample(400, seed=2),
        _users(200, seed=3).assign(hours_since_buy=np.nan, coupons=pd.array([None] * 200, dtype="Int64")),
        "buy",
        numeric,
        CATEGORICAL,
    )
    assert math.isfinite(report["dcr"]["median_ratio"]) and math.isfinite(report["correlation"]["mean_abs"])


def test_an_interrupted_fit_resumes_to_the_same_weights():
    torch.set_num_threads(1)
    frame = _users(200, seed=2)
    fit = dict(numeric=NUMERIC, categorical=CATEGORICAL, log=None)
    whole = TabularGAN(_small_config(epochs=4))
    whole.fit(frame, "buy", **fit)
    states: dict[int, dict] = {}
    first = TabularGAN(_small_config(epochs=4))

    def keep(entry, state):
        states[int(entry["epoch"])] = copy.deepcopy(state)
        if entry["epoch"] == 2:
            raise KeyboardInterrupt  # the process dies after epoch 2 was saved

    with pytest.raises(KeyboardInterrupt):
        first.fit(frame, "buy", on_epoch=keep, **fit)
    resumed = TabularGAN(_small_config(epochs=4))
    history = resumed.fit(frame, "buy", resume=states[2], **fit)
    assert [h["epoch"] for h in history] == [3.0, 4.0]  # epochs 1-2 are not run again
    for net in ("generator", "critic"):
        a, b = getattr(whole, net).state_dict(), getattr(resumed, net).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), net
    pd.testing.assert_frame_equal(whole.sample(50, seed=0), resumed.sample(50, seed=0))
    with pytest.raises(ShopsightError, match="cannot resume: the saved fit had columns"):
        TabularGAN(_small_config(epochs=4)).fit(frame, "buy", numeric=["views"], resume=states[2], log=None)


def test_gan_data_splits_users_and_picks_the_generated_columns(tmp_path):
    from tests.conftest import purchase_frame

    from shopsight.training.synthetic_users.train import GanData

    path = tmp_path / "training_set.parquet"
    purchase_frame(users=200, days=3).to_parquet(path)
    data = GanData.read(path)
    assert data.numeric == ["n_pv_1d", "n_cart_1d", "cvr_buy_pv_1d", "hours_since_buy", "seq_length"]
    assert data.categorical == ["segment_id"] and data.label == "buy_next_1d"
    users = [set(part.user_id) for part in (data.train, data.valid, data.test)]
    assert [len(u) for u in users] == [140, 20, 40]  # 70/10/20 of 200 users, every row of a user together
    assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
    assert len(data.train) + len(data.valid) + len(data.test) == 600
    assert GanData.read(path, seed=1).test.user_id.tolist() != data.test.user_id.tolist()
    assert GanData.read(path).test.equals(data.test)  # seeded: the driver and the worker agree


def test_gan_data_errors_name_the_file_and_the_problem(tmp_path):
    from tests.conftest import purchase_frame

    from shopsight.training.synthetic_users.train import GanData

    frame = purchase_frame(users=50, days=2)
    cases = {
        "missing.parquet": (None, "no such training set"),
        "empty.parquet": (frame.iloc[:0], "the training set is empty"),
        "unlabelled.parquet": (frame.drop(columns=["buy_next_1d"]), "missing column(s) buy_next_1d"),
        "ids.parquet": (frame[["user_id", "buy_next_1d", "segment_id"]], "no numeric feature columns"),
        "few.parquet": (
            purchase_frame(users=3, days=2),
            "users (4 rows) lack buyers or non-buyers; 3 users are too few",
        ),
    }
    for name, (rows, message) in cases.items():
        if rows is not None:
            rows.to_parquet(tmp_path / name)
        with pytest.raises(ShopsightError, match=re.escape(message)) as caught:
            GanData.read(tmp_path / name)
        assert name in str(caught.value)
