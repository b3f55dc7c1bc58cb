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


@pytest.fixture(scope="session")
def taobao_features(spark, taobao_sample, tmp_path_factory):
    """Features of the real Taobao sample, snapshot days 2017-11-25 .. 12-02, built once per session."""
    from datetime import date

    from shopsight.features.build import build_features

    settings = component_settings(tmp_path_factory.mktemp("taobao_features"))
    result = build_features(settings, taobao_sample, date(2017, 11, 25), date(2017, 12, 2))
    return settings, result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    return _free_port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port, stopped at the end of the session."""
    import os
    import shutil
    import subprocess
    import time

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (make test installs it: apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        process.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)
