"""Settings: precedence CLI > env > config files > ecosystem variables > profile > default, sources, unknown
keys refused, user profiles, YAML values, `config show -o yaml` read back by --config."""

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
    assert rows["spark.conf.spark.hadoop.fs.s3a.secret.key"] == "***"  # an entry of a mapping: its own row

    as_file = subprocess.run(
        [sys.executable, "-m", "shopsight", "--profile", "cluster", "config", "show", "-o", "yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert as_file.returncode == 0, as_file.stderr
    for name, (_, secret) in SECRETS.items():
        if name != "SHOPSIGHT_SERVING__API_KEYS":  # a settings file holds the whole digest, no credential
            assert secret not in as_file.stdout + as_file.stderr, f"{name}: {secret} is shown"
    assert "***" not in as_file.stdout  # left out, not masked: a file that loads never sets a password to ***
    assert "mlflow.backend_store_uri" in as_file.stderr and "spark.conf.spark.hadoop" in as_file.stderr


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


# --- the ecosystem's variables, user config and profiles ----------------------------------------------


def test_ecosystem_variables_fill_what_shopsight_settings_leave():
    """MLFLOW_TRACKING_URI, RAY_ADDRESS (a Jobs API URL) and Spark's MASTER beat the profile; anything
    written for Shopsight beats them."""
    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow.team:5000",
        "RAY_ADDRESS": "http://ray-head.team:8265",
        "MASTER": "spark://spark.team:7077",
    }
    for profile in ("local", "cluster"):
        resolved = load_settings(profile=profile, environ=env)
        s = resolved.settings
        assert s.mlflow.tracking_uri == "http://mlflow.team:5000"
        assert _source(resolved, "mlflow.tracking_uri") == "env:MLFLOW_TRACKING_URI"
        assert (
            s.ray.address == "http://ray-head.team:8265"
            and _source(resolved, "ray.address") == "env:RAY_ADDRESS"
        )
        assert (
            s.spark.master == "spark://spark.team:7077" and _source(resolved, "spark.master") == "env:MASTER"
        )

    resolved = load_settings(
        overrides={"spark.master": "local[2]"},
        environ={**env, "SHOPSIGHT_MLFLOW__TRACKING_URI": "http://ours:5000"},
    )
    assert resolved.settings.mlflow.tracking_uri == "http://ours:5000"
    assert _source(resolved, "mlflow.tracking_uri") == "env:SHOPSIGHT_MLFLOW__TRACKING_URI"
    assert resolved.settings.spark.master == "local[2]" and _source(resolved, "spark.master") == "cli"
    # an explicit null is a setting too: --set mlflow.tracking_uri= runs the local server
    assert (
        load_settings(overrides={"mlflow.tracking_uri": None}, environ=env).settings.mlflow.tracking_uri
        is None
    )


def test_ecosystem_variables_that_name_no_server_are_not_settings():
    """RAY_ADDRESS as ray.init reads it (a GCS address: Ray sets one in every job) and an MLflow URI that
    is a file or a database are no Jobs API or tracking server."""
    env = {"RAY_ADDRESS": "10.0.0.5:6379", "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    resolved = load_settings(environ=env)
    assert resolved.settings.ray.address is None and _source(resolved, "ray.address") == "profile:local"
    assert resolved.settings.mlflow.tracking_uri is None


def _user_config(tmp_path, text, profiles=None):
    folder = tmp_path / "xdg" / "shopsight"
    (folder / "profiles").mkdir(parents=True)
    (folder / "config.yaml").write_text(text)
    for name, body in (profiles or {}).items():
        (folder / "profiles" / f"{name}.yaml").write_text(body)
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}, folder


def test_user_config_and_config_file_layers(tmp_path):
    """defaults < profile < ecosystem < user config < SHOPSIGHT_CONFIG / --config < SHOPSIGHT_* < --set."""
    env, folder = _user_config(
        tmp_path,
        "data:\n  batch_rows: 10\nfeatures:\n  segments: 3\nmlflow:\n  tracking_uri: http://user:5000\n",
    )
    config = tmp_path / "team.yaml"
    config.write_text("data:\n  batch_rows: 20\n")
    env = {**env, "MLFLOW_TRACKING_URI": "http://shell:5000", "SHOPSIGHT_CONFIG": str(config)}

    resolved = load_settings(environ=env)
    user_file = f"file:{folder / 'config.yaml'}"
    assert resolved.settings.features.segments == 3 and _source(resolved, "features.segments") == user_file
    assert resolved.settings.mlflow.tracking_uri == "http://user:5000"  # a file beats the shell's variable
    assert (
        resolved.settings.data.batch_rows == 20 and _source(resolved, "data.batch_rows") == f"file:{config}"
    )

    explicit = tmp_path / "mine.yaml"
    explicit.write_text("data:\n  batch_rows: 30\n")
    assert load_settings(config_file=explicit, environ=env).settings.data.batch_rows == 30  # --config wins
    env_over = {**env, "SHOPSIGHT_DATA__BATCH_ROWS": "40"}
    assert load_settings(config_file=explicit, environ=env_over).settings.data.batch_rows == 40

    # without XDG_CONFIG_HOME (or with a relative one, which the XDG rule ignores): ~/.config
    home = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": "relative"}
    (tmp_path / "home" / ".config").mkdir(parents=True)
    (tmp_path / "home" / ".config" / "shopsight").symlink_to(folder)
    assert load_settings(environ=home).settings.features.segments == 3


def test_user_profiles(tmp_path):
    env, folder = _user_config(
        tmp_path,
        "profile: staging\n"
        "profiles:\n"
        "  staging:\n    spark: {master: 'spark://staging:7077'}\n"
        "  cluster:\n    ray: {address: 'http://our-head:8265'}\n",  # layered over the built-in cluster
        profiles={"gpu": "serving:\n  num_gpus: 1\n"},
    )
    resolved = load_settings(environ=env)  # the user config's profile:
    assert resolved.settings.profile == "staging" and resolved.settings.spark.master == "spark://staging:7077"
    assert _source(resolved, "spark.master") == "profile:staging"
    assert _source(resolved, "profile") == f"file:{folder / 'config.yaml'}"

    cluster = load_settings(profile="cluster", environ=env).settings
    assert cluster.ray.address == "http://our-head:8265" and cluster.spark.master.startswith("spark://spark-")
    assert load_settings(environ={**env, "SHOPSIGHT_PROFILE": "gpu"}).settings.serving.num_gpus == 1

    with pytest.raises(ConfigError) as info:
        load_settings(profile="prod", environ=env)
    assert "unknown profile 'prod': choose one of local, cluster, staging, gpu" in str(info.value)
    (folder / "profiles" / "staging.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match="profile 'staging' is defined twice"):
        load_settings(environ=env)


# --- values from the CLI and the environment are YAML; mapping entries by their own names -------------


def test_set_values_are_yaml():
    from shopsight.cli._context import parse_overrides

    overrides = parse_overrides([
        "features.windows=[1,2]",
        "mlflow.tracking_uri=",
        "ray.address=null",
        "spark.conf.spark.sql.shuffle.partitions=4",
        "spark.master=local[2]",
        "feast.project=0123",  # text for a text setting: never YAML 1.1's octal 83
        "data.batch_rows=2000",
        "serving.shadow=yes",
        "object_store.bucket='null'",  # quoted: the text
    ])  # fmt: skip
    s = load_settings(overrides=overrides, environ={}).settings
    assert s.features.windows == (1, 2) and s.mlflow.tracking_uri is None and s.ray.address is None
    assert s.spark.conf == {"spark.sql.shuffle.partitions": "4"} and s.spark.master == "local[2]"
    assert s.feast.project == "0123" and s.data.batch_rows == 2000 and s.serving.shadow is True
    assert s.object_store.bucket == "null"

    with pytest.raises(ConfigError, match="--set features.windows is not valid JSON or YAML"):
        parse_overrides(["features.windows=[1,"])
    assert parse_overrides(["mlflow.tracking_token=[x"]) == {"mlflow.tracking_token": "[x"}  # a secret: text


def test_mapping_entries_add_up_across_layers(tmp_path):
    """An entry of spark.conf is named after the mapping, dots and all; each layer adds or replaces entries,
    each with its own source."""
    config = tmp_path / "c.yaml"
    config.write_text("spark:\n  conf:\n    spark.a: 1\n    spark.b: true\n")
    resolved = load_settings(
        config_file=config,
        overrides={"spark.conf.spark.c": "3"},
        environ={"SHOPSIGHT_SPARK__CONF": '{"spark.b": "false"}'},
    )
    assert resolved.settings.spark.conf == {"spark.a": "1", "spark.b": "false", "spark.c": "3"}
    assert _source(resolved, "spark.conf.spark.a") == f"file:{config}"
    assert _source(resolved, "spark.conf.spark.b") == "env:SHOPSIGHT_SPARK__CONF"
    assert _source(resolved, "spark.conf.spark.c") == "cli"
    shown = {key: value for key, value, _ in resolved.shown_items()}
    assert shown["spark.conf.spark.b"] == "'false'" and shown["features.windows"] == "[1, 3, 7]"
    assert shown["serving.api_keys"] == "{}" and shown["ray.head_resources"] == "{}"  # empty mappings too


# --- `config show -o yaml` is a settings file ----------------------------------------------------------


def _config_show(tmp_path, *args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "shopsight", *args, "config", "show", "-o", "yaml"],
        cwd=tmp_path, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_config_show_yaml_reads_back_to_the_same_settings(tmp_path):
    registry, password = SECRETS["SHOPSIGHT_FEAST__REGISTRY"]
    env = {"MLFLOW_TRACKING_URI": "http://mlflow.team:5000", "SHOPSIGHT_FEAST__REGISTRY": registry}
    sets = [
        "features.windows=[2,5]",
        "spark.conf.spark.sql.shuffle.partitions=4",
        f"serving.api_keys.growth={API_KEY_DIGEST}",
        "serving.autoscaling={max_replicas: 3}",
    ]
    sets = [arg for value in sets for arg in ("--set", value)]
    first = _config_show(tmp_path, "--profile", "cluster", *sets, env=env)
    assert first.returncode == 0, first.stderr
    assert API_KEY_DIGEST in first.stdout  # whole: a digest is no credential, and a prefix would not load
    assert "feast.registry" in first.stderr and password not in first.stdout + first.stderr
    (tmp_path / "saved.yaml").write_text(first.stdout)

    again = _config_show(tmp_path, "--config", "saved.yaml", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert (
        load_settings(
            config_file=tmp_path / "saved.yaml", environ={}
        ).settings.serving.autoscaling.max_replicas
        == 3
    )


def test_a_masked_secret_in_a_file_is_refused(tmp_path):
    """A file that says *** where `config show` masked a secret would set the secret to ***."""
    config = tmp_path / "c.yaml"
    for line in ("mlflow:\n  backend_store_uri: postgresql://mlflow:***@db/mlflow\n",
                 "spark:\n  conf:\n    spark.hadoop.fs.s3a.secret.key: '***'\n"):  # fmt: skip
        config.write_text(line)
        with pytest.raises(ConfigError, match=r"c.yaml: .* is a secret masked by `shopsight config show`"):
            load_settings(config_file=config, environ={})


def test_a_job_of_a_users_profile_runs_where_that_profile_is_unknown(tmp_path):
    """A job's settings file holds every value; the profile it names may be one of this machine's user."""
    import yaml

    from shopsight.platform.jobs import job_settings

    env, _ = _user_config(tmp_path, "profiles:\n  staging:\n    spark: {master: 'spark://staging:7077'}\n")
    settings = load_settings(profile="staging", environ=env).settings
    shipped = tmp_path / "shopsight-settings.yaml"
    shipped.write_text(yaml.safe_dump(job_settings(settings, local_cluster=False)))
    assert load_settings(config_file=shipped, environ={}).settings.spark.master == "spark://staging:7077"
