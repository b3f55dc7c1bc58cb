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


# --- secrets are never shown ---------------------------------------------------------------------------

API_KEY_DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SECRETS = {  # variable -> (value, the secret in it)
    "FEAST_REDIS_PASSWORD": ("rp-4f1c9e", "rp-4f1c9e"),  # no setting: never shown at all
    "SHOPSIGHT_FEAST__REDIS_URL": ("redis://shopsight:ru-77a1@redis:6379/0", "ru-77a1"),
    "SHOPSIGHT_FEAST__REGISTRY": ("postgresql+psycopg://feast:fe@st-p8w@db:5432/feast", "st-p8w"),
    "SHOPSIGHT_MLFLOW__BACKEND_STORE_URI": ("postgresql://mlflow@db/mlflow?password=mq-5e2", "mq-5e2"),
    "SHOPSIGHT_MLFLOW__TRACKING_URI": ("http://ops:mt-0c3d@mlflow:5000", "mt-0c3d"),
    "SHOPSIGHT_OBJECT_STORE__ENDPOINT_URL": ("http://minio:mo-91b0@minio:9000", "mo-91b0"),
    "SHOPSIGHT_SPARK__CONF": ('{"spark.hadoop.fs.s3a.secret.key": "sk-3d8e"}', "sk-3d8e"),
    "SHOPSIGHT_SERVING__API_KEYS": (f'{{"growth": "{API_KEY_DIGEST}"}}', API_KEY_DIGEST[8:]),
}


def test_config_show_masks_every_secret_set_through_the_environment(tmp_path):
    """Passwords inside URLs (in the user part, with an unescaped @, or as ?password=), secret Spark
    settings and API-key digests set as SHOPSIGHT_* variables, and the Redis password: none reaches
    `config show`'s output."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "250", **{name: value for name, (value, _) in SECRETS.items()}}
    result = subprocess.run(
        [sys.executable, "-m", "shopsight", "--profile", "cluster", "config", "show"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name, (_, secret) in SECRETS.items():
        assert secret not in output, f"{name}: {secret} is shown"
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in output.splitlines() if "│" in line
    }
    assert rows["feast.redis_password_file"] == "null"
    assert rows["feast.redis_url"] == "redis://shopsight:***@redis:6379/0"
    assert rows["feast.registry"] == "postgresql+psycopg://feast:***@db:5432/feast"
    assert rows["mlflow.backend_store_uri"] == "postgresql://mlflow@db/mlflow?password=***"
    assert rows["serving.api_keys.growth"] == f"{API_KEY_DIGEST[:8]}…"
    assert rows["ray.auth_token_path"] == "~/.ray/auth_token"  # where a token is: no secret
    assert rows["spark.conf"] == "{'spark.hadoop.fs.s3a.secret.key': '***'}"


def test_secret_settings_are_known_by_name():
    """A secret a section adds later (a token, a password) is masked without being listed anywhere."""
    from shopsight.platform._settings import is_secret_setting, shown_value

    for name in ("x.redis_password", "mlflow.tracking_token", "mlflow.auth_password", "x.client_secret",
                 "spark.hadoop.fs.s3a.access.key", "serving.credentials"):  # fmt: skip
        assert is_secret_setting(name), name
        assert shown_value(name, "v4lue") == "***"
    for name in ("ray.auth_token_path", "feast.redis_password_file", "mlflow.credentials_file",
                 "feast.redis_url", "serving.api_keys.team", "spark.master"):  # fmt: skip
        assert not is_secret_setting(name), name
    assert shown_value("x.redis_password", None) == "null"  # unset is worth seeing


def test_a_secret_from_the_environment_is_never_parsed_or_quoted():
    """SHOPSIGHT_* values starting with { or [ are read as JSON, except those named as secrets (a password
    may start so); a value that does not parse is an error that does not quote it."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"SHOPSIGHT_MLFLOW__TRACKING_TOKEN": "{tok: [x"})
    assert "unknown setting 'mlflow.tracking_token'" in str(info.value) and "[x" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"SHOPSIGHT_SPARK__CONF": "{spark: [x"})
    assert "SHOPSIGHT_SPARK__CONF is not valid JSON" in str(info.value) and "[x" not in str(info.value)
