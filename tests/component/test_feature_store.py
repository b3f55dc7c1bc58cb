"""The Feast store over the real build: online equals offline in SQLite and Redis, point-in-time training
sets, the HTTP feature server, pushes, and clear errors."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from tests.conftest import installed

from shopsight.features import store
from shopsight.features.client import FeatureClient
from shopsight.platform import ShopsightError

pytestmark = [pytest.mark.spark, pytest.mark.feast]

LAST = "2017-12-02"


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
            return (a is None or (isinstance(a, float) and math.isnan(a))) and (
                b is None or (isinstance(b, float) and math.isnan(b))
            )
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    if hasattr(b, "tolist"):
        b = b.tolist()
    if isinstance(a, list) or isinstance(b, list):
        return list(a or []) == list(b if b is not None else [])
    return a == b


def _offline_last(settings, table):
    frame = pd.read_parquet(settings.data_dir.absolute() / "features" / table)
    return frame[frame.snapshot_day.astype(str) == LAST].set_index("user_id")


def _linked_settings(make_settings, base, tmp_path, **overrides):
    """Settings with their own Feast registry and online store, over the same built features."""
    (tmp_path / "features").symlink_to(base.data_dir.absolute() / "features")
    return make_settings(tmp_path, **overrides)


@pytest.fixture(scope="module")
def sqlite_store(taobao_features, make_settings, tmp_path_factory):
    base, _ = taobao_features
    settings = _linked_settings(make_settings, base, tmp_path_factory.mktemp("feast_sqlite"))
    names = store.apply(settings)
    assert {
        "user_activity",
        "user_sequence",
        "purchase_propensity_v1",
        "churn_risk_v1",
        "next_item_v1",
        "user_profile_v1",
    } <= set(names)
    store.materialize(settings)
    return settings


@pytest.fixture(scope="module")
def redis_store(taobao_features, make_settings, tmp_path_factory, redis_url):
    base, _ = taobao_features
    settings = _linked_settings(
        make_settings,
        base,
        tmp_path_factory.mktemp("feast_redis"),
        **{"feast.online_store": "redis", "feast.redis_url": redis_url},
    )
    store.apply(settings)
    heard = []
    views = store.materialize(settings, on_view=lambda *step: heard.append(step))
    # view after view, as a progress bar shows them: each as it starts, then once at the end
    assert heard == [(i, len(views), v) for i, v in enumerate(views)] + [(len(views), len(views), "")]
    assert {"user_activity", "user_sequence", "user_segment"} <= set(views)
    return settings


def _users(settings, n=12):
    activity = _offline_last(settings, "user_activity")
    return sorted(activity.index.to_series().sample(n, random_state=0).tolist())


@pytest.mark.parametrize("backend", ["sqlite_store", "redis_store"])
def test_online_equals_offline(backend, request):
    settings = request.getfixturevalue(backend)
    users = _users(settings)
    online = store.online_features(settings, "purchase_propensity_v1", [{"user_id": u} for u in users])
    offline = {t: _offline_last(settings, t) for t in ("user_activity", "user_sequence", "user_segment")}
    compared = 0
    for name, values in online.items():
        if name == "user_id":
            assert values == users
            continue
        table = next(t for t, frame in offline.items() if name in frame.columns)
        for user, value in zip(users, values, strict=True):
            assert _same(value, offline[table].loc[user, name]), (backend, user, name, value)
            compared += 1
    assert compared >= 12 * 45
    # an unknown user gets nulls, not an error
    unknown = store.online_features(settings, "next_item_v1", [{"user_id": 10**12}])
    assert unknown["seq_item_ids"] == [None]


def test_training_set_is_point_in_time_correct(sqlite_store, tmp_path):
    settings = sqlite_store
    heard = []
    path, rows = store.training_set(
        settings,
        "purchase_propensity_v1",
        date(2017, 11, 27),
        date(2017, 11, 29),
        tmp_path / "t.parquet",
        on_view=lambda *step: heard.append(step),
    )
    joined_views = [name for _, _, name in heard[:-1]]
    assert len(joined_views) >= 3 and heard[-1] == (len(joined_views), len(joined_views), "")
    assert [done for done, _, _ in heard] == list(range(len(joined_views) + 1))
    frame = pd.read_parquet(path)
    labels = pd.read_parquet(settings.data_dir.absolute() / "features" / "labels")
    in_range = labels[labels.snapshot_day.astype(str).between("2017-11-27", "2017-11-29")]
    assert rows == len(frame) == len(in_range)
    activity = pd.read_parquet(settings.data_dir.absolute() / "features" / "user_activity")
    activity["snapshot_ts"] = activity["snapshot_ts"].astype("datetime64[ns, UTC]")
    sample = frame.sample(40, random_state=1)
    joined = sample.merge(
        activity,
        left_on=["user_id", "event_timestamp"],
        right_on=["user_id", "snapshot_ts"],
        suffixes=("", "_want"),
    )
    assert len(joined) == len(sample)
    assert (joined.n_pv_7d == joined.n_pv_7d_want).all() and (joined.n_buy_3d == joined.n_buy_3d_want).all()
    differs = 0
    for row in sample.itertuples():
        nxt = activity[(activity.user_id == row.user_id) & (activity.snapshot_ts > row.event_timestamp)]
        differs += int(not nxt.empty and nxt.iloc[0].n_pv_7d != row.n_pv_7d)
    assert differs > 0, "later snapshots differ, so the join really picked the row of its own time"
    assert frame.buy_next_1d.dtype == bool and frame.seq_length.notna().all()


def test_churn_training_set_drops_the_unknown_labels(sqlite_store, tmp_path, caplog):
    """Up to the last snapshot day (12-02), with events until 12-03: churn_3d is unknown on 12-01 and
    12-02, whose 3 next days were not observed; those rows are dropped, and said so."""
    settings = sqlite_store
    with caplog.at_level("WARNING", logger="shopsight.features"):
        path, rows = store.training_set(
            settings,
            "churn_risk_v1",
            date(2017, 11, 29),
            date(2017, 12, 2),
            tmp_path / "c.parquet",
            label="churn_3d",
        )
    frame = pd.read_parquet(path)
    labels = pd.read_parquet(settings.data_dir.absolute() / "features" / "labels")
    in_range = labels[labels.snapshot_day.astype(str).between("2017-11-29", "2017-12-02")]
    known = in_range.dropna(subset=["churn_3d"])
    assert rows == len(frame) == len(known) < len(in_range)
    assert set(known.snapshot_day.astype(str)) == {"2017-11-29", "2017-11-30"}
    assert f"churn_3d: dropped {len(in_range) - len(known)} of {len(in_range)} rows" in caplog.text
    assert frame.churn_3d.dtype == bool and "buy_next_1d" not in frame.columns
    assert frame.seq_length.notna().all() and frame.n_pv_7d.notna().all()
    with pytest.raises(ShopsightError, match="no label 'churn_7d'.*known: buy_next_1d, churn_3d"):
        store.training_set(
            settings,
            "churn_risk_v1",
            date(2017, 11, 29),
            date(2017, 12, 2),
            tmp_path / "x.parquet",
            label="churn_7d",
        )


def test_unknown_feature_service_is_a_clear_error(sqlite_store, tmp_path):
    with pytest.raises(
        ShopsightError, match="unknown feature service 'user_profile_v9'; known: .*user_profile_v1"
    ):
        store.online_features(sqlite_store, "user_profile_v9", [{"user_id": 1}])
    with pytest.raises(ShopsightError, match="unknown feature service"):
        store.training_set(
            sqlite_store, "nope", date(2017, 11, 27), date(2017, 11, 28), tmp_path / "x.parquet"
        )
    with pytest.raises(ShopsightError, match="no feature view or service named 'nope'"):
        store.describe(sqlite_store, "nope")
    described = store.describe(sqlite_store, "user_activity")
    assert described.owner == "shopsight_features"
    assert all(f.description and f.owner for f in described.fields)
    assert {"n_pv_7d", "hours_since_buy", "top_categories"} <= {f.name for f in described.fields}


# teams and their API keys; the settings hold only the digests
KEYS = {"shopsight_features": "owner-key", "team_a": "key-a", "team_b": "key-b"}
OWNER = KEYS["shopsight_features"]  # the key of the services' owner


def _team_env(key: str | None = None, **extra) -> dict[str, str]:
    """The environment of a command or server that knows the teams; ``key``: whose key it acts with."""
    from shopsight.platform.api_keys import hash_key

    env = {k: v for k, v in os.environ.items() if k != "SHOPSIGHT_API_KEY"} | extra
    env |= {f"SHOPSIGHT_SERVING__API_KEYS__{team.upper()}": hash_key(k) for team, k in KEYS.items()}
    if key:
        env["SHOPSIGHT_API_KEY"] = key
    return env


def _shopsight(settings, *args, key=None):
    return subprocess.run(
        [sys.executable, "-m", "shopsight", "--data-dir", str(settings.data_dir), *args],
        capture_output=True, text=True, timeout=120, env=_team_env(key, COLUMNS="200"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def granted(sqlite_store):
    """team_a may read user_profile_v1; team_b that and purchase_propensity_v1; granted by the owner."""
    refused = _shopsight(sqlite_store, "features", "grant", "team_a", "user_profile_v1", key=KEYS["team_b"])
    assert refused.returncode == 1
    assert (
        "only the owner of 'user_profile_v1' (shopsight_features) may change who reads it" in refused.stderr
    )
    nobody = _shopsight(sqlite_store, "features", "grant", "team_z", "user_profile_v1", key=OWNER)
    assert nobody.returncode == 1 and "no team 'team_z'" in nobody.stderr, nobody.stderr
    for team, service in [("team_a", "user_profile_v1"), ("team_b", "user_profile_v1"),
                          ("team_b", "purchase_propensity_v1")]:  # fmt: skip
        done = _shopsight(sqlite_store, "features", "grant", team, service, key=OWNER)
        assert done.returncode == 0 and f"{team} may read {service}" in done.stdout, done.stderr
    return sqlite_store


@contextmanager
def _feature_server(settings, port: int, env: dict | None = None, workers: int = 1):
    """`shopsight features serve` on ``port``, knowing the teams of KEYS, answering: yields its process,
    stopped at the end."""
    server = subprocess.Popen(
        [sys.executable, "-m", "shopsight", "--data-dir", str(settings.data_dir), "features", "serve",
         "--port", str(port), "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_team_env(**(env or {})),
        start_new_session=True,
    )  # fmt: skip
    try:
        client = FeatureClient(f"http://127.0.0.1:{port}")
        deadline = time.time() + 90
        while not client.health():
            assert server.poll() is None, "feature server exited"
            assert time.time() < deadline, "feature server did not start"
            time.sleep(0.5)
        yield server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_http_feature_server_returns_the_same_values(granted, free_port, tmp_path):
    port = free_port()
    # gunicorn's default control socket, ~/.gunicorn/gunicorn.ctl (or under $XDG_RUNTIME_DIR), is one per
    # user: the server must open its data directory's own instead (checked below)
    env = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": ""}
    with _feature_server(granted, port, env):
        client = FeatureClient(f"http://127.0.0.1:{port}", api_key=KEYS["team_b"])
        deadline = time.time() + 90
        users = _users(granted, 5)
        over_http = client.get("user_profile_v1", users)
        in_process = store.online_features(granted, "user_profile_v1", [{"user_id": u} for u in users])
        assert set(over_http) == set(in_process)
        for name in in_process:
            assert all(_same(a, b) for a, b in zip(over_http[name], in_process[name], strict=True)), name
        readable = "team_b may read: purchase_propensity_v1, user_profile_v1"
        with pytest.raises(ShopsightError, match=f"answered 404: no feature service 'nope_v1'; {readable}"):
            client.get("nope_v1", users)

        from gunicorn.ctl.client import ControlClient

        control = store.control_socket(granted, port)
        assert control == granted.data_dir.absolute() / "feast" / f"feature-server-{port}.ctl"
        while not control.is_socket():
            assert time.time() < deadline, "no control socket under the data directory"
            time.sleep(0.2)
        assert not (tmp_path / "home" / ".gunicorn").exists()
        with ControlClient(str(control), timeout=10) as gunicornc:  # and it is this server's
            listeners = gunicornc.send_command("show listeners")["listeners"]
        assert [listener["address"] for listener in listeners] == [f"http://127.0.0.1:{port}"]


def _lookup(port, body, key=None, **kwargs):
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kwargs.setdefault("json", body)
    return requests.post(
        f"http://127.0.0.1:{port}/get-online-features", headers=headers, timeout=30, **kwargs
    )


def test_the_feature_server_knows_teams_grants_and_bad_input(granted, free_port):
    """Keys (401), grants per service (403 naming it), bad input (4xx naming the field and row, never a
    500), a read log and per-team metrics, counted over both of the server's worker processes whichever
    answers the scrape; a revocation takes effect on the running server; grants survive a restart."""
    import requests

    port = free_port()
    users = _users(granted, 3)
    profile = {"feature_service": "user_profile_v1", "entities": {"user_id": users}}
    propensity = {"feature_service": "purchase_propensity_v1", "entities": {"user_id": users}}
    log_path = granted.data_dir.absolute() / "feast" / "reads" / "reads.jsonl"
    before = len(log_path.read_text().splitlines()) if log_path.exists() else 0
    with _feature_server(granted, port, workers=2):
        assert _lookup(port, profile).status_code == 401
        wrong = _lookup(port, profile, key="not-a-key")
        assert wrong.status_code == 401 and wrong.json()["error"].startswith("wrong API key")
        denied = _lookup(port, propensity, key=KEYS["team_a"])
        assert denied.status_code == 403
        assert "team_a may not read feature service 'purchase_propensity_v1'" in denied.json()["error"]
        # as the README shows it: curl -d sends a form's content type, and the body is JSON all the same
        curl = subprocess.run(
            ["curl", "-s", "-H", f"Authorization: Bearer {KEYS['team_a']}", "-d", json.dumps(profile),
             f"http://127.0.0.1:{port}/get-online-features"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        body = json.loads(curl.stdout)
        names = body["metadata"]["feature_names"]
        assert "user_id" in names and "n_buy_7d" in names
        # every feature carries its timestamp: the snapshot it comes from
        column = body["results"][names.index("n_buy_7d")]
        assert len(column["event_timestamps"]) == 3
        assert {t[:10] for t in column["event_timestamps"]} == {"2017-12-02"}
        owner = _lookup(port, propensity, key=OWNER)  # the owner reads its own
        assert owner.status_code == 200

        def refused(status, body, key=KEYS["team_a"], **kwargs):
            response = _lookup(port, body, key, **kwargs)
            assert response.status_code == status, response.text
            return response.json()["error"]

        text_id = {"feature_service": "user_profile_v1", "entities": {"user_id": [users[0], "738"]}}
        assert refused(422, text_id) == 'entities.user_id[1] is "738": user_id takes whole numbers'
        assert "unknown join key 'customer'" in refused(422, {**profile, "entities": {"customer": [1]}})
        assert "exactly one of" in refused(422, {"entities": {"user_id": [1]}})
        assert refused(400, None, data=b"{not json").startswith("the body is not JSON")
        assert "at most 1,000" in refused(422, {**profile, "entities": {"user_id": list(range(1001))}})
        assert "body over" in refused(413, None, data=b"[" + b"1," * 40_000 + b"1]")
        features = refused(403, {"features": ["user_sequence:seq_item_ids"], "entities": {"user_id": [1]}})
        assert features.startswith("team_a may not read user_sequence:seq_item_ids")
        assert "they are in churn_risk_v1, next_item_v1, purchase_propensity_v1" in features
        assert _lookup(port, {"features": ["user_segment:segment_id"], "entities": {"user_id": users}},
                       KEYS["team_a"]).status_code == 200  # fmt: skip
        assert requests.post(f"http://127.0.0.1:{port}/push", json={}, timeout=10).status_code == 404

        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert metrics.status_code == 401
        scrapes = [requests.get(f"http://127.0.0.1:{port}/metrics", headers={"X-API-Key": KEYS["team_b"]},
                                timeout=10).text for _ in range(6)]  # fmt: skip
        # both workers answered lookups (each keeps its counts in a file of its own), and every scrape,
        # whichever worker answered it, reports the same: the sum of both
        folder = granted.data_dir.absolute() / "feast" / f"feature-server-{port}-metrics"
        assert len({path.name.rsplit("_", 1)[-1] for path in folder.glob("counter_*.db")}) == 2
        metrics = scrapes[0]

        from prometheus_client.parser import text_string_to_metric_families

        samples = [sample for family in text_string_to_metric_families(metrics) for sample in family.samples]

        def count(name, **labels):
            return sum(s.value for s in samples if s.name == name and s.labels == labels)

        def served(status, service="-", team="team_a"):
            return count("shopsight_feature_requests_total", team=team, service=service, status=status)

        assert served("200", "user_profile_v1") == 1 and served("200", "features") == 1
        assert served("403", "purchase_propensity_v1") == 1 and served("403", "features") == 1
        assert served("422") == 4 and served("400") == 1 and served("413") == 1
        assert served("401", team="-") == 2
        assert served("200", "purchase_propensity_v1", team="shopsight_features") == 1
        assert count("shopsight_feature_entities_total", team="team_a", service="user_profile_v1") == 3
        assert count("shopsight_feature_request_seconds_count", team="team_a") == 10

        def counted(text):
            return sorted(line for line in text.splitlines() if line.startswith("shopsight_feature_"))

        assert all(counted(scrape) == counted(metrics) for scrape in scrapes)

        revoked = _shopsight(granted, "features", "revoke", "team_a", "user_profile_v1", key=OWNER)
        assert revoked.returncode == 0, revoked.stderr
        deadline = time.time() + 30  # the server reads the registry again every 5 s
        while _lookup(port, profile, key=KEYS["team_a"]).status_code == 200:
            assert time.time() < deadline, "the revocation never reached the server"
            time.sleep(0.5)
        assert _lookup(port, profile, key=KEYS["team_a"]).status_code == 403

    lines = [json.loads(line) for line in log_path.read_text().splitlines()[before:]]
    assert len(lines) >= 15 and all(
        set(line) == {"time", "team", "service", "entities", "status", "ms"} for line in lines
    )
    assert {"team": "team_a", "service": "user_profile_v1", "entities": 3, "status": 200} in [
        {k: line[k] for k in ("team", "service", "entities", "status")} for line in lines
    ]

    listed = json.loads(_shopsight(granted, "features", "grants", "-o", "json").stdout)
    assert {r["service"]: r["teams"] for r in listed}["user_profile_v1"] == ["team_b"]
    permissions = _feast("-c", str(store.feast_dir(granted)), "permissions", "list")
    assert "read-user_profile_v1" in permissions.stdout, permissions.stderr
    with _feature_server(granted, port):  # restarted: the grants are the registry's
        assert _lookup(port, propensity, key=KEYS["team_b"]).status_code == 200
        assert _lookup(port, profile, key=KEYS["team_a"]).status_code == 403
    again = _shopsight(granted, "features", "grant", "team_a", "user_profile_v1", key=OWNER)
    assert again.returncode == 0, again.stderr


CLIENT = """
import json, sys
from feast import FeatureStore

store = FeatureStore(repo_path=sys.argv[1])
rows = [{"user_id": int(u)} for u in sys.argv[3:]]
values = store.get_online_features(features=store.get_feature_service(sys.argv[2]), entity_rows=rows)
print(json.dumps(values.to_dict()))
"""


def test_another_team_reads_with_feast_alone(granted, free_port, tmp_path, model_venv):
    """A process with only feast installed (no Shopsight, torch, pyspark or ray) reads, through the
    platform's feature server and Feast's `remote` online store, what the platform reads in process, with
    its team's key in SHOPSIGHT_API_KEY. Its feature_store.yaml is what `shopsight features repo-yaml
    --server URL` prints."""
    python = model_venv(["feast==0.67.0"])
    absent = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print([m for m in ('shopsight', 'torch', 'pyspark', "
         "'ray', 'mlflow') if u.find_spec(m)])"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = tmp_path / "team-b"
    client.mkdir()
    printed = _shopsight(granted, "features", "repo-yaml", "--server", url)
    assert printed.returncode == 0, printed.stderr
    (client / store.REPO_FILE).write_text(printed.stdout)
    users = _users(granted, 5)

    def read(service, key):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPSIGHT_")}
        return subprocess.run(
            [str(python), "-c", CLIENT, str(client), service, *map(str, users)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env | {"SHOPSIGHT_API_KEY": key},
        )  # fmt: skip

    with _feature_server(granted, port):
        for service in ("user_profile_v1", "purchase_propensity_v1"):
            done = read(service, KEYS["team_b"])
            assert done.returncode == 0, done.stderr[-3000:]
            remote = json.loads(done.stdout.strip().splitlines()[-1])
            local = store.online_features(granted, service, [{"user_id": u} for u in users])
            assert set(remote) == set(local) and len(local) > 10, service
            for name in local:
                assert all(_same(a, b) for a, b in zip(remote[name], local[name], strict=True)), name
        denied = read("purchase_propensity_v1", KEYS["team_a"])
        assert denied.returncode != 0
        assert "team_a may not read feature service 'purchase_propensity_v1'" in denied.stderr


@pytest.mark.parametrize("backend", ["sqlite_store", "redis_store"])
def test_push_shows_up_online_at_once(backend, request, tmp_path):
    from shopsight.features.push import push_events

    settings = request.getfixturevalue(backend)
    user = _users(settings, 1)[0]
    before = store.online_features(settings, "purchase_propensity_v1", [{"user_id": user}])
    last_ts = 1512230400 + 3600  # an hour after the last snapshot (2017-12-02, end of day in China)
    new = tmp_path / "new.csv"
    new.write_text(
        f"{user},900001,77,pv,{last_ts + 60}\n{user},900002,77,cart,{last_ts + 120}\n"
        f"{user},900002,77,buy,{last_ts + 180}\nbroken,row\n"
    )
    result = push_events(settings, new)
    assert result.events == 3 and result.rejected == {"wrong_field_count": 1}
    after = store.online_features(settings, "purchase_propensity_v1", [{"user_id": user}])
    assert after["seq_item_ids"][0][-3:] == [900001, 900002, 900002]
    assert after["seq_behaviors"][0][-3:] == ["pv", "cart", "buy"]
    assert after["seq_item_ids"][0] == (before["seq_item_ids"][0] + [900001, 900002, 900002])[-50:]
    assert after["seq_length"][0] == min(50, before["seq_length"][0] + 3)
    for w in (1, 3, 7):
        assert after[f"n_pv_{w}d"][0] == before[f"n_pv_{w}d"][0] + 1
        assert after[f"n_buy_{w}d"][0] == before[f"n_buy_{w}d"][0] + 1
    assert after["hours_since_buy"][0] == pytest.approx(0.0)
    assert after["hours_since_pv"][0] == pytest.approx(120 / 3600)


@pytest.mark.parametrize("backend", ["sqlite_store", "redis_store"])
@pytest.mark.parametrize("service", ["next_item_v1", "purchase_propensity_v1", "user_profile_v1"])
def test_serving_path_reader_equals_the_sdk(backend, service, request):
    from shopsight.features.online import OnlineFeatureReader

    settings = request.getfixturevalue(backend)
    users = [*_users(settings, 6), 10**12]  # and one unknown user
    reader = OnlineFeatureReader(settings, service)
    fast = reader.read(users)
    sdk = store.online_features(settings, service, [{"user_id": u} for u in users])
    assert set(fast) == set(sdk)
    for name, values in sdk.items():
        assert all(_same(a, b) for a, b in zip(fast[name], values, strict=True)), name
    assert all(values[-1] is None for name, values in fast.items() if name != "user_id")
    only = OnlineFeatureReader(settings, "purchase_propensity_v1", features=["seq_item_ids", "n_buy_7d"])
    assert set(only.read(users[:2])) == {"user_id", "seq_item_ids", "n_buy_7d"}


# ------------------------------------------------------------------- Feast's own CLI and UI on the repository


def _feast(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    feast = Path(sys.executable).parent / "feast"
    return subprocess.run(
        [str(feast), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def test_feasts_cli_lists_every_view_and_service_of_the_repository(sqlite_store, tmp_path):
    from feast import FeatureService, FeatureView

    from shopsight.features.definitions import repository

    folder = store.feast_dir(sqlite_store)
    yaml_text = (folder / store.REPO_FILE).read_text()
    assert yaml_text == store.repo_yaml(sqlite_store)  # written by apply
    objects = repository(sqlite_store)
    views = {o.name for o in objects if isinstance(o, FeatureView)}
    services = {o.name for o in objects if isinstance(o, FeatureService)}
    assert {"user_activity", "user_sequence", "item_stats"} <= views and "purchase_propensity_v1" in services
    # from another folder, as another team runs it: the file names every path it needs
    listed = _feast("-c", str(folder), "feature-views", "list")
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip()}
    assert names == views
    listed = _feast("-c", str(folder), "feature-services", "list")
    assert listed.returncode == 0, listed.stderr
    assert {line.split()[0] for line in listed.stdout.splitlines()[1:] if line.strip()} == services


def test_the_repository_file_holds_no_secret(redis_store):
    """The Redis password stays in the environment: the file says ${FEAST_REDIS_PASSWORD}, and Feast's CLI
    reads the store with it set, and is refused without it."""
    folder = store.feast_dir(redis_store)
    text = (folder / store.REPO_FILE).read_text()
    password = store.redis_target(redis_store.feast).password
    assert password and password not in text and "password=${FEAST_REDIS_PASSWORD}" in text
    listed = _feast("-c", str(folder), "feature-views", "list", env={"FEAST_REDIS_PASSWORD": password})
    assert listed.returncode == 0 and "user_activity" in listed.stdout, listed.stderr


def _repository_views(settings) -> set[str]:
    from feast import FeatureView

    from shopsight.features.definitions import repository

    return {o.name for o in repository(settings) if isinstance(o, FeatureView)}


def test_feast_ui_shows_the_catalog_in_a_browser(sqlite_store, tmp_path, free_port):
    """`feast ui` on the repository, looked at by headless Chromium: the Feature Views page lists the
    views (the screenshot is kept under the test's folder)."""

    import requests

    browser = installed("chromium", "chromium-browser", package="chromium")
    port = free_port()
    feast = Path(sys.executable).parent / "feast"
    ui = subprocess.Popen(
        [
            str(feast),
            "-c",
            str(store.feast_dir(sqlite_store)),
            "ui",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        views = f"http://127.0.0.1:{port}/api/v1/feature_views?project=shopsight"
        while True:  # the page reads the registry through this REST API: wait until it serves the views
            assert ui.poll() is None, "feast ui exited"
            try:
                answer = requests.get(views, timeout=5)
                if answer.ok and "user_activity" in answer.text:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "feast ui did not serve the registry in 90 s"
            time.sleep(0.5)
        page = f"http://127.0.0.1:{port}/p/shopsight/feature-view"
        common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000",
                  "--virtual-time-budget=30000"]  # fmt: skip
        dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True, timeout=120)
        screenshot = tmp_path / "feast-ui-feature-views.png"
        shot = subprocess.run([*common, f"--screenshot={screenshot}", page], capture_output=True, timeout=120)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    assert dom.returncode == 0, dom.stderr[-2000:]
    (tmp_path / "feast-ui-feature-views.html").write_text(dom.stdout)  # kept beside the screenshot
    # the page's text, as a reader sees it: the table of views, one row per view of the repository
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)[^>]*>.*?</\1>", "", dom.stdout, flags=re.S))
    text = re.sub(r"\s+", " ", text)
    rows = re.search(r"This table contains (\d+) rows", text)
    assert rows and int(rows.group(1)) == len(views := _repository_views(sqlite_store)), text[-2000:]
    shown = set(re.findall(r"\b([a-z_]+) ↦ \d+ ↦", text))
    assert shown == views, (shown, views)
    assert shot.returncode == 0 and screenshot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_the_packed_layout_answers_as_feasts_own(
    sqlite_store, taobao_features, make_settings, tmp_path_factory
):
    """The packed online store (the default layout) against Feast's own SQLite layout over the same
    features: the SDK, the serving path and the feature server's JSON give the same values; a write of
    some of a view's features keeps the others."""
    from feast.feature_server_utils import convert_response_to_dict

    from shopsight.features.gateway import PackedAnswers
    from shopsight.features.online import OnlineFeatureReader
    from shopsight.features.packed import PackedStore

    base, _ = taobao_features
    stock = _linked_settings(
        make_settings, base, tmp_path_factory.mktemp("feast_stock"), **{"feast.online_layout": "feast"}
    )
    sqlite_store = _linked_settings(make_settings, base, tmp_path_factory.mktemp("feast_packed"))
    for settings in (stock, sqlite_store):  # both fresh: the module's store has had pushes
        store.apply(settings)
        store.materialize(settings)
    packed_store = store.feature_store(sqlite_store)
    assert isinstance(packed_store._get_provider().online_store, PackedStore)
    assert not isinstance(store.feature_store(stock)._get_provider().online_store, PackedStore)
    users = _users(sqlite_store, 20) + [999_999_999]  # and one the store does not know
    rows = [{"user_id": u} for u in users]
    answers = PackedAnswers(packed_store, packed_store._get_provider().online_store)

    def by_name(response: dict) -> dict:
        return dict(zip(response["metadata"]["feature_names"], response["results"], strict=True))

    for service in ("purchase_propensity_v1", "user_profile_v1", "next_item_v1"):
        packed, feasts = (
            store.online_features(sqlite_store, service, rows),
            store.online_features(stock, service, rows),
        )
        assert set(packed) == set(feasts)
        for name in feasts:
            assert all(_same(a, b) for a, b in zip(packed[name], feasts[name], strict=True)), name
        read = OnlineFeatureReader(sqlite_store, service).read(users)
        for name in read:
            assert all(_same(a, b) for a, b in zip(read[name], feasts[name], strict=True)), name
        assert read["n_pv_7d" if "n_pv_7d" in read else "seq_length"][-1] is None
        fast = json.loads(answers.answer({"feature_service": service, "entities": {"user_id": users}}))
        proto = (
            store.feature_store(stock)
            .get_online_features(
                features=store.feature_store(stock).get_feature_service(service), entity_rows=rows
            )
            .proto
        )
        assert by_name(fast) == by_name(json.loads(json.dumps(convert_response_to_dict(proto)))), service

    user = users[0]
    before = store.online_features(sqlite_store, "purchase_propensity_v1", [{"user_id": user}])
    # Feast's own writes carry whole rows; a store's batch write may carry only some features
    from datetime import UTC, datetime

    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    key = EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=user)])
    write = [(key, {"n_pv_1d": Value(int64_val=before["n_pv_1d"][0] + 1000)}, datetime.now(UTC), None)]
    packed_store._get_provider().online_store.online_write_batch(
        packed_store.config, packed_store.get_feature_view("user_activity"), write, None
    )
    after = store.online_features(sqlite_store, "purchase_propensity_v1", [{"user_id": user}])
    assert after["n_pv_1d"][0] == before["n_pv_1d"][0] + 1000
    assert {k: v for k, v in after.items() if k != "n_pv_1d"} == {
        k: v for k, v in before.items() if k != "n_pv_1d"
    }


TEAM_DEFINITIONS = """
from datetime import timedelta
from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast.types import Float32, Int64

user = Entity(name="user", join_keys=["user_id"])  # the platform's entity, used, not changed
scores_source = FileSource(name="team_a_scores_source", path={path!r}, timestamp_field="event_timestamp")
team_a_scores = FeatureView(
    name="team_a_scores", entities=[user], ttl=timedelta(days=2), source=scores_source,
    schema=[Field(name="user_id", dtype=Int64), Field(name="score", dtype=Float32, description="A score.")],
)
team_a_scores_v1 = FeatureService(name="team_a_scores_v1", features=[team_a_scores])
"""


def test_only_the_owner_changes_or_deletes_its_definitions(granted, tmp_path):
    """A team applies its own definitions and owns them; another team cannot change or delete them, nor
    can the team change the platform's; the owner grants reads of its service; the platform's apply
    leaves a team's objects alone."""
    scores = tmp_path / "scores.parquet"
    pd.DataFrame(
        {"user_id": [1, 2], "event_timestamp": pd.to_datetime(["2017-12-02", "2017-12-02"], utc=True),
         "score": [0.5, 0.25]}
    ).to_parquet(scores, coerce_timestamps="us")  # fmt: skip
    mine = tmp_path / "team_a_features.py"
    mine.write_text(TEAM_DEFINITIONS.format(path=str(scores)))

    applied = _shopsight(granted, "features", "apply", "--definitions", str(mine), key=KEYS["team_a"])
    assert applied.returncode == 0, applied.stderr
    assert "team_a_scores, team_a_scores_v1" in applied.stdout
    assert "user," not in applied.stdout  # the platform's entity was referenced, not applied
    described = json.loads(_shopsight(granted, "features", "describe", "team_a_scores", "-o", "json").stdout)
    assert described["owner"] == "team_a"

    theirs = _shopsight(granted, "features", "apply", "--definitions", str(mine), key=KEYS["team_b"])
    assert theirs.returncode == 1
    # the first of its objects that is not team_b's: the source, in the file's order
    owned = "DataSource 'team_a_scores_source' belongs to team_a: only its owner may change it (team_b asked)"
    assert owned in theirs.stderr
    platform = tmp_path / "platform_view.py"
    platform.write_text(
        TEAM_DEFINITIONS.format(path=str(scores)).replace('name="team_a_scores",', 'name="user_activity",')
    )
    clobber = _shopsight(granted, "features", "apply", "--definitions", str(platform), key=KEYS["team_a"])
    assert clobber.returncode == 1 and "'user_activity' belongs to shopsight_features" in clobber.stderr
    store.apply(granted)  # the platform's own apply keeps the team's objects
    assert store.describe(granted, "team_a_scores").owner == "team_a"

    shared = _shopsight(granted, "features", "grant", "team_b", "team_a_scores_v1", key=KEYS["team_a"])
    assert shared.returncode == 0, shared.stderr
    refused = _shopsight(granted, "features", "delete", "team_a_scores_v1", key=KEYS["team_b"])
    assert refused.returncode == 1
    assert (
        "FeatureService 'team_a_scores_v1' belongs to team_a: only its owner may delete it" in refused.stderr
    )
    in_use = _shopsight(granted, "features", "delete", "team_a_scores", key=KEYS["team_a"])
    assert in_use.returncode == 1 and "is used by team_a_scores_v1" in in_use.stderr
    for name in ("team_a_scores_v1", "team_a_scores"):
        gone = _shopsight(granted, "features", "delete", name, key=KEYS["team_a"])
        assert gone.returncode == 0 and f"{name} deleted" in gone.stdout, gone.stderr
    listed = {
        r["service"] for r in json.loads(_shopsight(granted, "features", "grants", "-o", "json").stdout)
    }
    assert "team_a_scores_v1" not in listed
    no_key = _shopsight(granted, "features", "apply", "--definitions", str(mine))
    assert no_key.returncode == 1 and "set SHOPSIGHT_API_KEY" in no_key.stderr


def test_scheduled_materialisation_refills_a_restarted_redis(
    redis_store, redis_server, taobao_features, make_settings, tmp_path_factory, monkeypatch
):
    """`features materialize --every 2s` goes on through a Redis outage (one line per failed run), and
    when Redis comes back empty, loads everything again: serving has its features back with nobody
    re-materialising by hand. `features list` shows the views' staleness."""
    import threading

    base, _ = taobao_features
    db1 = redis_server.url.replace("/0", "/1")  # its own Redis database; the restart empties both
    settings = _linked_settings(
        make_settings,
        base,
        tmp_path_factory.mktemp("feast_schedule"),
        **{"feast.online_store": "redis", "feast.redis_url": db1},
    )
    env = {
        **os.environ,
        "SHOPSIGHT_FEAST__ONLINE_STORE": "redis",
        "SHOPSIGHT_FEAST__REDIS_URL": db1,
        "FEAST_REDIS_PASSWORD": redis_server.password,
    }
    monkeypatch.setenv("FEAST_REDIS_PASSWORD", redis_server.password)  # for this process's own reads
    try:
        store.apply(settings)
        store.materialize(settings)
        users = _users(settings, 4)
        rows = [{"user_id": u} for u in users]
        before = store.online_features(settings, "purchase_propensity_v1", rows)
        assert all(v is not None for v in before["n_pv_7d"])

        listed = subprocess.run(
            [sys.executable, "-m", "shopsight", "--data-dir", str(settings.data_dir), "features", "list",
             "-o", "json"], capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        staleness = {r["name"]: r["staleness_s"] for r in json.loads(listed.stdout)}
        assert 0 <= staleness["user_activity"] < 300 and staleness["user_embedding"] is None

        loop = subprocess.Popen(
            [sys.executable, "-m", "shopsight", "--data-dir", str(settings.data_dir), "features",
             "materialize", "--every", "2s"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
        )  # fmt: skip
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(loop.stdout), daemon=True).start()

        def wait_for(text: str, after: int = 0, timeout: float = 120) -> int:
            deadline = time.time() + timeout
            while True:
                found = [i for i, line in enumerate(lines) if i >= after and text in line]
                if found:
                    return found[0]
                assert loop.poll() is None, "".join(lines)
                assert time.time() < deadline, f"no {text!r} line: " + "".join(lines)
                time.sleep(0.2)

        try:
            first = wait_for(" loaded ")
            redis_server.kill()
            failed = wait_for(" failed: ", first)
            redis_server.start()  # same port and password, no data
            back = time.time()
            lost = wait_for("online store lost its rows", failed)
            wait_for(" loaded ", lost)
            recovered_s = time.time() - back
            after = store.online_features(settings, "purchase_propensity_v1", rows)
            for name in before:
                assert all(_same(a, b) for a, b in zip(after[name], before[name], strict=True)), name
            assert recovered_s < 60, recovered_s
        finally:
            os.killpg(loop.pid, signal.SIGTERM)  # as `ray job stop` or Kubernetes stops it
            loop.wait(timeout=120)
        assert loop.returncode == 0
        assert re.fullmatch(r"stopped after \d+ runs \([1-9]\d* failed\)\n", lines[-1]), lines[-3:]
    finally:
        store.materialize(redis_store)  # the module's own Redis store, emptied by the restart, whole again
