"""Calibrated probabilities: the map fitted on one day makes the next day's probabilities mean what they
say, decile by decile; ECE and the decile table are checked against direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from shopsight.training.binary.calibration import Calibration
from shopsight.training.runtime.metrics import binary_report, decile_calibration, expected_calibration_error


def _day(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a known true probability and the inflated score a class-weighted network gives them."""
    truth = rng.beta(1.2, 4.0, n)  # base rate about 0.23, like buying tomorrow
    logit = np.log(truth / (1 - truth))
    raw = 1 / (1 + np.exp(-(1.3 * logit + 2.0)))  # ranks right, means wrong: ~0.9 for a 0.2 user
    return raw, (rng.random(n) < truth).astype(float)


def _stepped_day(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose distortion no logistic map undoes: the true rate jumps at a score of 0.5."""
    raw = rng.random(n)
    truth = np.where(raw < 0.5, 0.05 + 0.1 * raw, 0.4 + 0.5 * (raw - 0.5))
    return raw, (rng.random(n) < truth).astype(float)


@pytest.mark.parametrize(("day", "chosen"), [(_day, "platt"), (_stepped_day, "isotonic")])
def test_calibrated_probabilities_match_the_observed_rate_in_every_decile(day, chosen):
    rng = np.random.default_rng(0)
    # 100k rows a day, as a shop's validation day: each decile's rate is known to about +-0.005, so a
    # gap of 0.02 is the map's, not the sample's
    raw_valid, y_valid = day(rng, 100_000)
    raw_test, y_test = day(rng, 100_000)
    calibration = Calibration.fit(raw_valid, y_valid, "auto")
    assert calibration.method == chosen  # cross-validation picks the map that fits the distortion
    predicted, observed, rows = decile_calibration(y_test, calibration(raw_test))
    assert len(predicted) == 10 and rows.sum() == 100_000
    assert np.max(np.abs(predicted - observed)) < 0.02
    before = decile_calibration(y_test, raw_test)[:2]
    assert np.max(np.abs(before[0] - before[1])) > 0.1  # the uncalibrated scores were far off
    assert expected_calibration_error(y_test, calibration(raw_test)) < 0.015
    assert expected_calibration_error(y_test, raw_test) > 0.05
    # the map is monotone: the ranking (ROC-AUC) is kept, up to the ties of isotonic steps
    auc_raw = binary_report(y_test, raw_test)["roc_auc"]
    assert binary_report(y_test, calibration(raw_test))["roc_auc"] == pytest.approx(auc_raw, abs=0.005)


def test_auto_picks_platt_on_few_rows_and_the_map_survives_a_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    raw, y = _day(rng, 400)
    assert Calibration.fit(raw, y, "auto").method == "platt"
    raw, y = _stepped_day(rng, 5000)
    fitted = Calibration.fit(raw, y, "auto")
    assert fitted.method == "isotonic"
    fitted.save(tmp_path / "calibration.json")
    again = Calibration.load(tmp_path / "calibration.json")
    probe = np.linspace(0, 1, 101)
    assert np.array_equal(again(probe), fitted(probe))
    assert Calibration.load(tmp_path / "absent.json")(probe).tolist() == probe.tolist()  # older models
    with pytest.raises(ValueError, match="unknown calibration method 'beta'"):
        Calibration.fit(raw, y, "beta")


def test_ece_and_brier_against_direct_computation():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.55, 0.45, 0.75, 0.25])
    bins = np.minimum((p * 10).astype(int), 9)
    direct = sum((bins == b).sum() * abs(p[bins == b].mean() - y[bins == b].mean()) for b in set(bins)) / 8
    assert expected_calibration_error(y, p) == pytest.approx(direct)
    report = binary_report(y, p)
    assert report["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert report["mean_probability"] == pytest.approx(p.mean())
