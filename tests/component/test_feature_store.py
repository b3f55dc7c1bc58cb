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
    assert described.owner == "shopsight-features"
    assert all(f.description and f.owner for f in described.fields)
    assert {"n_pv_7d", "hours_since_buy", "top_categories"} <= {f.name for f in described.fields}


@contextmanager
def _feature_server(settings, port: int, env: dict | None = None):
    """`shopsight features serve` on ``port``, answering: yields its process, stopped at the end."""
    server = subprocess.Popen(
        [sys.executable, "-m", "shopsight", "--data-dir", str(settings.data_dir), "features", "serve",
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
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


def test_http_feature_server_returns_the_same_values(sqlite_store, free_port, tmp_path):
    port = free_port()
    # gunicorn's default control socket, ~/.gunicorn/gunicorn.ctl (or under $XDG_RUNTIME_DIR), is one per
    # user: the server must open its data directory's own instead (checked below)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {"HOME": str(tmp_path / "home")}
    with _feature_server(sqlite_store, port, env):
        client = FeatureClient(f"http://127.0.0.1:{port}")
        deadline = time.time() + 90
        users = _users(sqlite_store, 5)
        over_http = client.get("user_profile_v1", users)
        in_process = store.online_features(sqlite_store, "user_profile_v1", [{"user_id": u} for u in users])
        assert set(over_http) == set(in_process)
        for name in in_process:
            assert all(_same(a, b) for a, b in zip(over_http[name], in_process[name], strict=True)), name
        with pytest.raises(ShopsightError, match="unknown feature service"):
            client.get("nope_v1", users)

        from gunicorn.ctl.client import ControlClient

        control = store.control_socket(sqlite_store, port)
        assert control == sqlite_store.data_dir.absolute() / "feast" / f"feature-server-{port}.ctl"
        while not control.is_socket():
            assert time.time() < deadline, "no control socket under the data directory"
            time.sleep(0.2)
        assert not (tmp_path / "home" / ".gunicorn").exists()
        with ControlClient(str(control), timeout=10) as gunicornc:  # and it is this server's
            listeners = gunicornc.send_command("show listeners")["listeners"]
        assert [listener["address"] for listener in listeners] == [f"http://127.0.0.1:{port}"]


CLIENT = """
import json, sys
from feast import FeatureStore

store = FeatureStore(repo_path=sys.argv[1])
rows = [{"user_id": int(u)} for u in sys.argv[3:]]
values = store.get_online_features(features=store.get_feature_service(sys.argv[2]), entity_rows=rows)
print(json.dumps(values.to_dict()))
"""


def test_another_team_reads_with_feast_alone(sqlite_store, free_port, tmp_path, model_venv):
    """A process with only feast installed (no Shopsight, torch, pyspark or ray) reads, through the
    platform's feature server and Feast's `remote` online store, what the platform reads in process. Its
    feature_store.yaml is what `shopsight features repo-yaml --server URL` prints."""
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
    printed = subprocess.run(
        [sys.executable, "-m", "shopsight", "--data-dir", str(sqlite_store.data_dir), "features", "repo-yaml",
         "--server", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    (client / store.REPO_FILE).write_text(printed.stdout)
    users = _users(sqlite_store, 5)
    with _feature_server(sqlite_store, port):
        for service in ("user_profile_v1", "purchase_propensity_v1"):
            read = subprocess.run(
                [str(python), "-c", CLIENT, str(client), service, *map(str, users)],
                capture_output=True, text=True, timeout=300, cwd=tmp_path,
            )  # fmt: skip
            assert read.returncode == 0, read.stderr[-3000:]
            remote = json.loads(read.stdout.strip().splitlines()[-1])
            local = store.online_features(sqlite_store, service, [{"user_id": u} for u in users])
            assert set(remote) == set(local) and len(local) > 10, service
            for name in local:
                assert all(_same(a, b) for a, b in zip(remote[name], local[name], strict=True)), name


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
    import shutil

    import requests

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        message = "Chromium is not installed (make test installs it: apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
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
