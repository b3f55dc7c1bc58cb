"""The cluster profile's shared services, for real on loopback: `shopsight mlflow up` on a throwaway
PostgreSQL (registration and promotion over HTTP, artifacts served by the server), the SQLite default, a
foreign server on the configured port, clear backend errors; the Redis login (its password from the
environment, never on a command line or in a message; a refused one is one clear line); and the `cluster`
Feast profile (Redis online store, SQL registry on PostgreSQL, Spark offline store) giving the local
profile's values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

NAME = "shopsight-next-item"


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The command in this process, as `main()` would end it (a ShopsightError becomes one error line)."""
    from typer.testing import CliRunner

    from shopsight.cli import app
    from shopsight.platform import ShopsightError, console

    width, console.width = console.width, 250
    try:
        # without the variable mlflow.set_tracking_uri leaves in this process: the command would take it
        # for a configured server, as it does a user's
        result = CliRunner().invoke(app, list(args), env={"MLFLOW_TRACKING_URI": None})
    finally:
        console.width = width
    output = result.output
    if isinstance(result.exception, ShopsightError):
        output += f"error: {result.exception}\n"
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, output, "")


def _summary(text: str) -> dict[str, str]:
    """The rows of a print_summary table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def _settings(data_dir, **overrides):
    from shopsight.platform import load_settings

    return load_settings(overrides={"data_dir": str(data_dir), **overrides}, environ={}).settings


# ------------------------------------------------------------------------------------------- MLflow


@pytest.mark.mlflow
@pytest.mark.slow
def test_mlflow_up_on_postgres_registers_and_promotes_over_http(postgres_url, free_port, tmp_path):
    import mlflow
    import psycopg
    from test_promotion import Registry

    from shopsight.platform.mlflow_server import healthy

    port, artifacts, backend = free_port(), tmp_path / "artifacts", postgres_url("mlflow")
    reg = Registry(tmp_path, port)  # its data_dir, port and helpers; the server is the one `up` starts
    cli = ["--data-dir", str(tmp_path / "dd"), "--set", f"mlflow.port={port}",
           "--set", f"mlflow.backend_store_uri={backend}",
           "--set", f"mlflow.artifact_root={artifacts}"]  # fmt: skip
    up = _cli(*cli, "mlflow", "up")
    try:
        assert up.returncode == 0, up.stdout
        rows = _summary(up.stdout)
        uri = f"http://127.0.0.1:{port}"
        assert "MLflow server started" in up.stdout
        assert rows["tracking URI"] == uri and rows["backend store"] == backend
        assert rows["artifact root"] == str(artifacts)

        # a run with a model, registered and promoted, all over HTTP
        reg.start()
        assert reg.uri == uri
        version = reg.register(trained=False)
        promoted = reg.run("models", "promote", NAME, "--reason", "first model on the shared server")
        assert promoted.returncode == 0, promoted.stdout
        assert reg.champion() == version
        tags = reg.client.get_model_version(NAME, version).tags
        assert (
            tags["promotion_reason"] == "first model on the shared server" and tags["gate.status"] == "first"
        )
        assert tags["promoted_by"] and tags["promoted_at"].endswith("Z") and tags["promoted_from"] == "none"
        (entry,) = reg.history()
        assert (entry["action"], entry["from"], entry["to"], entry["gate"]) == (
            "promote",
            None,
            version,
            "first",
        )
        model_tags = reg.client.get_registered_model(NAME).tags
        assert model_tags["eval.sha256"] and "promotion.lock" not in model_tags

        # the registry lives in PostgreSQL, the artifacts under the served root
        with psycopg.connect(backend.replace("+psycopg", "")) as db:
            aliases = db.execute(
                "SELECT alias, version FROM registered_model_aliases WHERE name = %s", (NAME,)
            ).fetchall()
            history = db.execute(
                "SELECT count(*) FROM registered_model_tags WHERE name = %s AND key LIKE 'history.%%'",
                (NAME,),
            ).fetchone()[0]
        assert ("champion", int(version)) in aliases and history == 1
        experiment = reg.client.get_experiment_by_name("next-item")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied, not a local path
        assert list(artifacts.rglob("MLmodel")), "the model's files are in the artifact root"
        loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")  # downloaded through the server
        assert len(loaded.predict(pd.DataFrame({"item_ids": [[100, 101, 102]]}))) == 1

        status = _cli(*cli, "mlflow", "status")
        assert "MLflow server running" in status.stdout and _summary(status.stdout)["tracking URI"] == uri
    finally:
        down = _cli(*cli, "mlflow", "down")
    assert down.returncode == 0 and f"Stopped the MLflow server at {uri}" in down.stdout, down.stdout
    assert not healthy(uri)
    status = _cli(*cli, "mlflow", "status")
    assert status.returncode == 1 and "MLflow server: not running" in status.stdout


@pytest.mark.mlflow
def test_mlflow_up_defaults_to_sqlite_and_is_reused(free_port, tmp_path):
    import sqlite3

    from mlflow import MlflowClient

    port = free_port()
    cli = ["--data-dir", str(tmp_path / "dd"), "--set", f"mlflow.port={port}"]
    up = _cli(*cli, "mlflow", "up")
    try:
        assert up.returncode == 0, up.stdout
        rows, uri = _summary(up.stdout), f"http://127.0.0.1:{port}"
        database = tmp_path / "dd" / "mlflow" / "mlflow.db"
        assert rows["tracking URI"] == uri and rows["backend store"] == f"sqlite:///{database}"
        assert rows["artifact root"] == str(tmp_path / "dd" / "mlflow" / "artifacts")
        MlflowClient(uri).create_experiment("round-trip")
        again = _cli(*cli, "mlflow", "up")
        assert "already running" in again.stdout and _summary(again.stdout)["pid"] == rows["pid"]
        # another backend for the running server: refused, not silently ignored
        other = _cli(
            *cli, "--set", f"mlflow.backend_store_uri=sqlite:///{tmp_path / 'other.db'}", "mlflow", "up"
        )
        assert other.returncode == 1 and "already runs at" in other.stdout and "mlflow down" in other.stdout
    finally:
        down = _cli(*cli, "mlflow", "down")
    assert "Stopped" in down.stdout
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM experiments WHERE name = 'round-trip'").fetchone()[0] == 1
    assert "was running" in _cli(*cli, "mlflow", "down").stdout  # nothing left to stop


class _Foreign(BaseHTTPRequestHandler):
    """Answers everything with 200, /health included, like any MLflow server would."""

    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.mark.mlflow
def test_a_foreign_server_on_the_port_is_never_taken_for_ours(free_port, tmp_path):
    from shopsight.platform import ShopsightError
    from shopsight.platform.mlflow_server import healthy, tracking_uri

    port = free_port()
    foreign = ThreadingHTTPServer(("127.0.0.1", port), _Foreign)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    # a stale record of this data directory names the port, and a live pid that is no MLflow server of ours
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    folder = tmp_path / "dd" / "mlflow"
    folder.mkdir(parents=True)
    record = {"uri": f"http://127.0.0.1:{port}", "pid": stranger.pid, "backend": "sqlite:///x.db",
              "artifact_root": str(folder / "artifacts")}  # fmt: skip
    (folder / "server.json").write_text(json.dumps(record))
    settings = _settings(tmp_path / "dd", **{"mlflow.port": str(port)})
    cli = ["--data-dir", str(tmp_path / "dd"), "--set", f"mlflow.port={port}"]
    try:
        assert healthy(f"http://127.0.0.1:{port}")  # it does answer, so health alone would fool us
        _Foreign.requests.clear()
        with pytest.raises(ShopsightError, match="not running"):
            tracking_uri(settings, start=False)
        status = _cli(*cli, "mlflow", "status")
        assert "not running" in status.stdout and f"port {port} is in use by another process" in status.stdout
        # `down` with the stale record stops nothing: the pid is not ours
        assert "was running" in _cli(*cli, "mlflow", "down").stdout and stranger.poll() is None
        (folder / "server.json").write_text(json.dumps(record))

        up = _cli(*cli, "mlflow", "up")
        assert up.returncode == 0, up.stdout
        assert f"port {port} is in use by another process" in up.stdout
        ours = _summary(up.stdout)["tracking URI"]
        assert ours.startswith("http://127.0.0.1:") and ours != f"http://127.0.0.1:{port}"
        assert tracking_uri(settings, start=False) == ours and healthy(ours)
        assert json.loads((folder / "server.json").read_text())["pid"] != stranger.pid
        assert _Foreign.requests == [], "the foreign server was never asked anything"
    finally:
        _cli(*cli, "mlflow", "down")
        foreign.shutdown()
        foreign.server_close()
        stranger.kill()
        stranger.wait()
    assert not healthy(ours)


@pytest.mark.mlflow
def test_bad_or_unreachable_backend_is_one_clear_line(free_port, tmp_path):
    closed = free_port()  # nothing listens there
    cases = {
        f"postgresql+psycopg://mlflow:s3cret@127.0.0.1:{closed}/mlflow": (
            f"cannot connect to the MLflow backend store postgresql+psycopg://mlflow:***@127.0.0.1:{closed}/mlflow"
        ),
        "mongodb://db:27017/mlflow": "is not a SQL database MLflow supports",
        "not a url": "is not a database URL",
    }
    for uri, expected in cases.items():
        result = subprocess.run(
            [sys.executable, "-m", "shopsight", "--data-dir", str(tmp_path / "dd"),
             "--set", f"mlflow.port={free_port()}", "--set", f"mlflow.backend_store_uri={uri}",
             "mlflow", "up"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"},
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 1 and "Traceback" not in output, output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], output
        assert "s3cret" not in output
    assert not (tmp_path / "dd" / "mlflow" / "server.json").exists()


# -------------------------------------------------------------------------------------- Redis login

FROM_ENV = "(from FEAST_REDIS_PASSWORD)"


def _redis_settings(data_dir, url: str, password_file=None):
    """Settings of a Redis online store at ``url``, with a password file or none (then the environment)."""
    from shopsight.platform import load_settings

    overrides = {"data_dir": str(data_dir), "feast.online_store": "redis", "feast.redis_url": url}
    if password_file is not None:
        overrides["feast.redis_password_file"] = str(password_file)
    return load_settings(overrides=overrides, environ={}).settings


@pytest.mark.feast
def test_redis_password_is_not_on_the_servers_command_line(redis_server):
    import psutil

    command = " ".join(psutil.Process(redis_server.pid).cmdline())
    assert "redis-server" in command and redis_server.password not in command
    assert redis_server.client().config_get("requirepass")["requirepass"] == redis_server.password


@pytest.mark.feast
def test_redis_login_from_the_environment_or_a_file_and_one_line_refusals(
    redis_server, tmp_path, monkeypatch
):
    """The right password from FEAST_REDIS_PASSWORD (or a file) reaches Feast's connection string and logs
    in; none, a wrong one (from the environment, a file or the URL) are one line naming Redis and where the
    password came from, never the password."""
    from shopsight.features.store import REDIS_CLIENT_OPTIONS, check_redis_login, repo_config
    from shopsight.platform import ShopsightError

    address, password = f"{redis_server.host}:{redis_server.port}", redis_server.password
    wrong = "wrong-" + password
    settings = _redis_settings(tmp_path, redis_server.url)

    def refusal(settings) -> str:
        with pytest.raises(ShopsightError) as refused:
            check_redis_login(settings.feast)
        return str(refused.value)

    monkeypatch.delenv("FEAST_REDIS_PASSWORD", raising=False)
    assert refusal(settings) == (
        f"Redis at {address} requires a password and none is set (FEAST_REDIS_PASSWORD or "
        "feast.redis_password_file)"
    )
    monkeypatch.setenv("FEAST_REDIS_PASSWORD", wrong)
    assert refusal(settings) == f"Redis at {address} refused the password {FROM_ENV}"
    monkeypatch.setenv("FEAST_REDIS_PASSWORD", password)
    check_redis_login(settings.feast)
    connection = repo_config(settings).online_store.connection_string
    assert connection == f"{address},db=0,password={password},{REDIS_CLIENT_OPTIONS}"  # short timeouts too

    # a file (a mounted Secret, its trailing newline ignored) wins over the environment
    secret = tmp_path / "redis-password"
    secret.write_text(wrong + "\n")
    assert refusal(_redis_settings(tmp_path, redis_server.url, secret)) == (
        f"Redis at {address} refused the password (from {secret}, feast.redis_password_file)"
    )
    secret.write_text(password + "\n")
    check_redis_login(_redis_settings(tmp_path, redis_server.url, secret).feast)
    assert refusal(_redis_settings(tmp_path, f"redis://:{wrong}@{address}/0")) == (
        f"Redis at {address} refused the password (from the password in feast.redis_url)"
    )

    # an ACL user: its name in the URL, its password from the environment
    client = redis_server.client()
    client.acl_setuser(
        "shopsight", enabled=True, passwords=[f"+{password}-acl"], keys="*", commands=["+@all"]
    )
    try:
        acl = _redis_settings(tmp_path, f"redis://shopsight@{address}/0")
        monkeypatch.setenv("FEAST_REDIS_PASSWORD", f"{password}-acl")
        check_redis_login(acl.feast)
        monkeypatch.setenv("FEAST_REDIS_PASSWORD", wrong)
        assert refusal(acl) == f"Redis at {address} refused the password of user 'shopsight' {FROM_ENV}"
    finally:
        client.acl_deluser("shopsight")


@pytest.mark.feast
def test_redis_without_a_password_refuses_one(free_port, tmp_path, monkeypatch):
    """A Redis that wants no password is an open one: with a password configured, that is an error."""
    import shutil
    import time

    import redis

    from shopsight.features.store import check_redis_login
    from shopsight.platform import ShopsightError

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        monkeypatch.setenv("FEAST_REDIS_PASSWORD", "pw-x")
        with pytest.raises(
            ShopsightError, match=rf"^Redis at 127.0.0.1:{port} has no password, but one is set"
        ):
            check_redis_login(_redis_settings(tmp_path, f"redis://127.0.0.1:{port}/0").feast)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.feast
def test_a_refused_redis_password_is_one_cli_line_without_it(redis_server, tmp_path):
    """Through the command, as a pod runs it: the password from the environment, one error line, and the
    password nowhere in the output."""
    wrong = "wrong-" + redis_server.password
    result = subprocess.run(
        [sys.executable, "-m", "shopsight", "--data-dir", str(tmp_path / "dd"),
         "--set", "feast.online_store=redis", "--set", f"feast.redis_url={redis_server.url}",
         "features", "list"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "300", "FEAST_REDIS_PASSWORD": wrong},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    address = f"{redis_server.host}:{redis_server.port}"
    assert errors == [f"error: Redis at {address} refused the password {FROM_ENV}"], output
    assert wrong not in output and redis_server.password not in output


def test_redis_logins_feast_cannot_carry_are_refused_before_use(tmp_path, monkeypatch):
    """Feast splits its connection string at commas and reads values as JSON: such a password would reach
    Redis changed, so it is a settings error (which never quotes it), as is a password given twice."""
    from shopsight.features.store import redis_connection_string, redis_target
    from shopsight.platform import ConfigError

    for bad in ("pw,7q9", "8675309", "1e93", '"pw7q9"'):
        monkeypatch.setenv("FEAST_REDIS_PASSWORD", bad)
        with pytest.raises(ConfigError) as info:
            redis_connection_string(_redis_settings(tmp_path, "redis://redis:6379/0").feast)
        assert "(from FEAST_REDIS_PASSWORD)" in str(info.value) and bad not in str(info.value)
    monkeypatch.setenv("FEAST_REDIS_PASSWORD", "pw-ok")
    secret = tmp_path / "password"
    secret.write_text("two")
    with pytest.raises(ConfigError, match="given twice"):
        redis_target(_redis_settings(tmp_path, "redis://:one@redis:6379/0", secret).feast)
    with pytest.raises(ConfigError, match="cannot read feast.redis_password_file"):
        redis_target(_redis_settings(tmp_path, "redis://redis:6379/0", tmp_path / "missing").feast)
    with pytest.raises(ConfigError) as info:
        redis_target(_redis_settings(tmp_path, "http://:s3cret@redis:6379/0").feast)
    assert "is not a Redis URL" in str(info.value) and "s3cret" not in str(info.value)
    target = redis_target(_redis_settings(tmp_path, "rediss://shop@r:6380/2").feast)
    assert target.password == "pw-ok" and "pw-ok" not in repr(target)
    assert redis_connection_string(_redis_settings(tmp_path, "rediss://shop@r:6380/2").feast) == (
        "r:6380,db=2,username=shop,password=pw-ok,ssl=true"
    )


# -------------------------------------------------------------------------------------------- Feast


def _own_db(redis_url: str) -> str:
    """The session's Redis, database 1: test_feature_store's Redis store (and its pushes) use database 0."""
    return redis_url.rsplit("/", 1)[0] + "/1"


@pytest.fixture(scope="module")
def feast_profiles(taobao_features, make_settings, tmp_path_factory, redis_server, postgres_url):
    """The local profile's store (SQLite online, file offline, file registry) and the cluster profile's
    (Redis online with its password, Spark offline, SQL registry on PostgreSQL) over the same built
    features, both applied and materialised."""
    from shopsight.features import store

    base, _ = taobao_features
    stores = {}
    # the password as a pod would mount it from the Secret
    redis_password_file = tmp_path_factory.mktemp("redis_secret") / "password"
    redis_password_file.write_text(redis_server.password + "\n")
    redis_password_file.chmod(0o600)
    overrides = {
        "local": {},
        "cluster": {
            "feast.online_store": "redis",
            "feast.redis_url": _own_db(redis_server.url),
            "feast.redis_password_file": str(redis_password_file),
            "feast.offline_store": "spark",
            "feast.registry": postgres_url("feast"),
        },
    }
    for profile, values in overrides.items():
        folder = tmp_path_factory.mktemp(f"feast_{profile}")
        (folder / "features").symlink_to(base.data_dir.absolute() / "features")
        settings = make_settings(folder, **values)
        store.apply(settings)
        store.materialize(settings)
        stores[profile] = settings
    return stores


@pytest.mark.spark
@pytest.mark.feast
@pytest.mark.slow
def test_cluster_feast_profile_gives_the_local_profiles_values(feast_profiles, postgres_url, redis_server):
    import psycopg

    from shopsight.features import store

    local, cluster = feast_profiles["local"], feast_profiles["cluster"]
    config = store.repo_config(cluster)
    # the packed layout's Redis store (the default), a Feast plugin
    assert (config.online_store.type, config.offline_store.type) == (store.PACKED_STORES["redis"], "spark")
    assert config.registry.registry_type == "sql"

    activity = pd.read_parquet(local.data_dir.absolute() / "features" / "user_activity")
    last = activity[activity.snapshot_day.astype(str) == "2017-12-02"]
    users = sorted(last.user_id.sample(12, random_state=0).tolist()) + [10**12]  # and one unknown user
    rows = [{"user_id": u} for u in users]
    for service in ("purchase_propensity_v1", "next_item_v1", "user_profile_v1"):
        want = store.online_features(local, service, rows)
        got = store.online_features(cluster, service, rows)
        assert got == want, service
    assert want["user_id"] == users
    assert (
        sum(v is not None for v in store.online_features(local, "purchase_propensity_v1", rows)["n_pv_7d"])
        == 12
    )

    # the registry is in PostgreSQL and the rows in Redis, not in files of the data directory
    with psycopg.connect(postgres_url("feast").replace("+psycopg", "")) as db:
        views = {r[0] for r in db.execute("SELECT feature_view_name FROM feature_views").fetchall()}
    assert {"user_activity", "user_sequence", "user_segment"} <= views
    assert redis_server.client(db=1).dbsize() > 0
    assert not (cluster.data_dir.absolute() / "feast" / "registry.db").exists()
    assert not (cluster.data_dir.absolute() / "feast" / "online.db").exists()


@pytest.mark.spark
@pytest.mark.feast
@pytest.mark.slow
def test_cluster_training_set_is_the_local_one(feast_profiles, tmp_path):
    """Point-in-time joins through the Spark offline store equal the file store's, including the last
    snapshot day (Feast's Spark queries read their time bounds in the session's time zone: run in the
    shop's, they lost the latest snapshot)."""
    from shopsight.features import store

    frames = {}
    for profile, settings in feast_profiles.items():
        path, rows = store.training_set(
            settings,
            "purchase_propensity_v1",
            date(2017, 11, 30),
            date(2017, 12, 1),
            tmp_path / f"{profile}.pq",
        )
        frame = pd.read_parquet(path).sort_values(["user_id", "event_timestamp"]).reset_index(drop=True)
        frames[profile] = frame
    local, cluster = frames["local"], frames["cluster"]
    assert len(local) == len(cluster) > 100
    assert local.n_pv_7d.notna().all() and cluster.n_pv_7d.notna().all()
    for column in local.columns:
        assert local[column].astype(str).tolist() == cluster[column].astype(str).tolist(), column
