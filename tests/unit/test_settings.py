"""Settings: precedence CLI > env > config file > profile > default, sources, unknown keys refused."""

from __future__ import annotations

from datetime import date

import pytest

from shopsight.platform import ConfigError, load_settings


def _source(resolved, key):
    return {k: s for k, _, s in resolved.items()}[key]


def test_defaults_are_the_embedded_local_profile():
    resolved = load_settings(environ={})
    s = resolved.settings
    assert s.profile == "local" and _source(resolved, "profile") == "default"
    assert s.spark.master == "local[*]" and s.feast.online_store == "sqlite" and s.ray.address is None
    assert s.data.window_start == date(2017, 11, 25) and s.data.timezone == "Asia/Shanghai"
    assert _source(resolved, "feast.online_store") == "profile:local"
    assert _source(resolved, "spark.driver_memory") == "default"


def test_cluster_profile_points_at_services():
    s = load_settings(profile="cluster", environ={}).settings
    assert s.spark.master.startswith("spark://")
    assert s.feast.online_store == "redis" and s.feast.redis_url.startswith("redis://")
    assert s.feast.registry.startswith("postgresql") and s.mlflow.backend_store_uri.startswith("postgresql")
    assert s.ray.address.startswith("http://") and s.object_store.endpoint_url


def test_precedence_cli_over_env_over_file_over_profile(tmp_path):
    config = tmp_path / "shopsight.yaml"
    config.write_text(
        "spark:\n  master: spark://from-file:7077\n  driver_memory: 3g\n"
        "feast:\n  online_store: redis\ndata:\n  batch_rows: 1000\n"
    )
    env = {"SHOPSIGHT_SPARK__MASTER": "spark://from-env:7077", "SHOPSIGHT_DATA__BATCH_ROWS": "2000"}
    resolved = load_settings(config_file=config, overrides={"spark.master": "local[2]"}, environ=env)
    s = resolved.settings
    assert s.spark.master == "local[2]" and _source(resolved, "spark.master") == "cli"
    assert (
        s.data.batch_rows == 2000 and _source(resolved, "data.batch_rows") == "env:SHOPSIGHT_DATA__BATCH_ROWS"
    )
    assert s.spark.driver_memory == "3g" and _source(resolved, "spark.driver_memory") == f"file:{config}"
    assert s.feast.online_store == "redis" and _source(resolved, "feast.online_store") == f"file:{config}"
    assert s.feast.offline_store == "file" and _source(resolved, "feast.offline_store") == "profile:local"


def test_profile_chosen_by_cli_then_env_then_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("profile: cluster\n")
    assert load_settings(config_file=config, environ={}).settings.profile == "cluster"
    assert (
        load_settings(config_file=config, environ={"SHOPSIGHT_PROFILE": "local"}).settings.profile == "local"
    )
    resolved = load_settings(profile="cluster", environ={"SHOPSIGHT_PROFILE": "local"})
    assert resolved.settings.profile == "cluster" and _source(resolved, "profile") == "cli"


def test_mapping_setting_from_env_json():
    s = load_settings(environ={"SHOPSIGHT_SPARK__CONF": '{"spark.executor.memory": "4g"}'}).settings
    assert s.spark.conf == {"spark.executor.memory": "4g"}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (
            {"environ": {"SHOPSIGHT_SPARK__MASTR": "x"}},
            "unknown setting 'spark.mastr' (from env:SHOPSIGHT_SPARK__MASTR)",
        ),
        (
            {"overrides": {"feast.online_store": "cassandra"}, "environ": {}},
            "feast.online_store: Input should be",
        ),
        ({"overrides": {"data.batch_rows": "many"}, "environ": {}}, "data.batch_rows"),
        ({"overrides": {"data.timezone": "Mars/Olympus"}, "environ": {}}, "unknown timezone 'Mars/Olympus'"),
        ({"overrides": {"nonsense": "1"}, "environ": {}}, "unknown setting 'nonsense' (from cli)"),
        ({"profile": "staging", "environ": {}}, "unknown profile 'staging'"),
        ({"overrides": {"Spark.Master": "x"}, "environ": {}}, "bad setting name"),
    ],
)
def test_bad_settings_are_errors_naming_the_key(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    assert fragment in str(info.value)


def test_unknown_key_in_config_file_names_the_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("spark:\n  masterr: local\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'spark.masterr' \(from file:.*c.yaml\)"):
        load_settings(config_file=config, environ={})
    config.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings(config_file=config, environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(config_file=tmp_path / "missing.yaml", environ={})
