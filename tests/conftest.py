"""Shared test helpers: the real data beside the checkout (../shared/data)."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def taobao_sample() -> Path:
    return shared_data("taobao/UserBehavior_sample_10k.csv")


@pytest.fixture(scope="session")
def sasrec_games() -> Path:
    return shared_data("sasrec/games.txt")
