"""Shared test helpers: the real data beside the checkout (../shared/data), the chaos cases' ``record``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """Path of a real data file; skips with the reason where it is absent, fails under CI."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"real data {path} is absent (see ../shared/data/README.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path


def installed(*names: str, package: str, why: str = "") -> str:
    """The path of the first of ``names`` on PATH; skips with the reason where none is (the Makefile's
    ``services`` installs ``package`` as root on Debian), fails under CI."""
    import shutil

    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"{names[0]} is not installed (make test installs it: apt-get install {package}){why}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def record(request):
    """``record(in_flight=..., lost=..., recovered=..., seconds_to_recover=...)``: a chaos case's counts
    (every ``chaos``-marked case, in tests/chaos and beside the worlds it needs), as one JSON line in
    ``$CHAOS_COUNTS_FILE``, which ``python -m benchmarks.chaos_report`` sets and turns into
    benchmarks/results/chaos.md; none is kept without it. Not a ``SHOPSIGHT_*`` name, which the settings
    would read as one of theirs."""

    def write(**counts) -> None:
        path = os.environ.get("CHAOS_COUNTS_FILE")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"case": request.node.name, "at": time.time(), **counts}) + "\n")

    return write


# The settings read the user's config directory and the variables of MLflow, Ray and Spark: the suite sees
# none of the shell's that runs it. They are cleared again before every test, since mlflow.set_tracking_uri
# exports MLFLOW_TRACKING_URI (for subprocesses): one test's local server must not become the next test's
# configured one.
_SHELL_SETTINGS = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MASTER", "SHOPSIGHT_CONFIG")


@pytest.fixture(autouse=True, scope="session")
def _no_user_settings(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
        for name in _SHELL_SETTINGS:
            patch.delenv(name, raising=False)
        yield


def _clear_shell_settings() -> None:
    # popped, not monkeypatched: `mlflow.set_tracking_uri` (in a test or a module's fixture) writes
    # MLFLOW_TRACKING_URI into os.environ, and a monkeypatch would put it back at teardown; left there, the
    # next module's CLI subprocesses would take a stopped server for a configured one
    for name in _SHELL_SETTINGS:
        os.environ.pop(name, None)


@pytest.fixture(autouse=True, scope="module")
def _no_settings_left_by_another_module():
    _clear_shell_settings()
    yield
    _clear_shell_settings()


@pytest.fixture(autouse=True)
def _no_settings_left_by_another_test():
    _clear_shell_settings()
    yield


@pytest.fixture(scope="session")
def taobao_sample() -> Path:
    return shared_data("taobao/UserBehavior_sample_10k.csv")


@pytest.fixture(scope="session")
def sasrec_games() -> Path:
    return shared_data("sasrec/games.txt")


def purchase_frame(users: int = 300, days: int = 4, seed: int = 0):
    """A small training set in the purchase_propensity_v1 layout with a learnable signal: users who
    carted in the last day (and whose sequence ends with a cart) buy the next day far more often."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for day in range(days):
        snapshot = pd.Timestamp("2017-11-25 16:00", tz="UTC") + pd.Timedelta(days=day)
        for user in range(1, users + 1):
            n = int(rng.integers(1, 30))
            carted = rng.random() < 0.3
            behaviors = ["pv"] * n
            if carted:
                behaviors[-1] = "cart"
            ts = int(snapshot.timestamp()) - np.sort(rng.integers(60, 3 * 86400, n))[::-1]
            rows.append(
                {
                    "user_id": user,
                    "event_timestamp": snapshot,
                    "buy_next_1d": bool(rng.random() < (0.6 if carted else 0.1)),
                    "n_pv_1d": n - int(carted),
                    "n_cart_1d": int(carted),
                    "cvr_buy_pv_1d": float(rng.random() / 10),
                    "hours_since_buy": np.nan if rng.random() < 0.5 else float(rng.integers(1, 200)),
                    "top_categories": np.array([1, 2, 3]),
                    "seq_item_ids": rng.integers(1000, 1050, n),
                    "seq_category_ids": rng.integers(1, 6, n),
                    "seq_behaviors": np.array(behaviors, dtype=object),
                    "seq_ts": ts,
                    "seq_length": n,
                    "segment_id": int(rng.integers(0, 3)),
                }
            )
    return pd.DataFrame(rows)
