"""The GAN and the synthetic-data metrics: metrics against hand-computed cases, a short fit that learns,
rows in the fitted schema, save/load, and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from shopsight.platform import ShopsightError
from shopsight.training.models import MODELS, build_model
from shopsight.training.models.gan import GANConfig, TabularGAN
from shopsight.training.synthetic import (
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
    with pytest.raises(ShopsightError, match="'spend' has 1 missing values"):
        gan.fit(frame.assign(spend=frame.spend.where(frame.index != 3)), "buy", **fit)
    gan.fit(frame, "buy", **fit)
    with pytest.raises(ShopsightError, match="unknown condition 'yes'"):
        gan.sample(3, "yes")
    with pytest.raises(ShopsightError, match="non-negative integer"):
        gan.sample(-1)
