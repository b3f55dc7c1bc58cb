"""Real local engines, shared per test session: one Spark (local[2], loopback)."""

from __future__ import annotations

import pytest

from shopsight.platform import Settings, load_settings


def component_settings(data_dir, **overrides) -> Settings:
    values = {"data_dir": str(data_dir), "spark.master": "local[2]", "spark.shuffle_partitions": "4"}
    values.update(overrides)
    return load_settings(overrides=values, environ={}).settings


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from shopsight.features._spark import build_spark

    session = build_spark(component_settings(tmp_path_factory.mktemp("spark")))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def make_settings():
    """Settings for a component test: loopback Spark with 2 cores, files under the given folder."""
    return component_settings
