"""Real local engines, shared per test session: one Spark (local[2], loopback), a redis-server with a
password and a throwaway PostgreSQL cluster (both on free loopback ports, removed at the end)."""

from __future__ import annotations

import pytest
from tests.conftest import installed

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
def model_venv(tmp_path_factory):
    """``model_venv(requirements) -> python``: a fresh virtualenv holding only ``requirements`` (the lines of
    registered models' requirements.txt) and what they depend on, nothing of Shopsight; made once per session
    for each set of requirements.

    Installed as ``make`` installs the platform: pinned and hash-checked by requirements/lock.txt, so the
    versions are the platform's and torch is its CPU build, which pip finds through ``PIP_FIND_LINKS`` (or
    ``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu``), never PyPI's CUDA build. The platform's
    pip installs into it (``pip --python``) and compiles no bytecode up front: the venv is used once."""
    import hashlib
    import subprocess
    import sys
    import time
    from pathlib import Path

    lock = Path(__file__).resolve().parents[2] / "requirements" / "lock.txt"
    made: dict[str, Path] = {}

    def make(requirements) -> Path:
        lines = sorted({line.strip() for line in requirements if line.strip()})
        key = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]
        if key not in made:
            folder = tmp_path_factory.mktemp(f"model-venv-{key}")
            listed = folder / "requirements.txt"
            listed.write_text("\n".join(lines) + "\n")
            started = time.perf_counter()
            venv = folder / "venv"
            subprocess.run(
                [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
            )
            python = venv / "bin" / "python"
            pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-compile", "--quiet"]
            done = subprocess.run(
                [*pip, "--requirement", str(listed), "--constraint", str(lock)],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            if done.returncode != 0:
                pytest.fail(f"pip could not install {lines} into a fresh venv:\n{done.stderr[-3000:]}")
            print(f"model venv {venv}: {len(lines)} requirements in {time.perf_counter() - started:.0f} s")
            made[key] = python
        return made[key]

    return make


class RedisServer:
    """A running redis-server that requires a password, as the cluster's does. Its configuration, password
    included, goes in on stdin (`redis-server -`): never on its command line, which `ps` shows every user of
    the machine. The chaos cases ``kill`` it and ``start`` it again: same port, same password, no data
    (nothing is saved, as a restarted Redis without persistence)."""

    def __init__(self, binary: str, host: str, port: int, password: str, folder) -> None:
        self.binary, self.host, self.port, self.folder = binary, host, port, folder
        self.password = password
        self._process = None

    def __repr__(self) -> str:  # no password: reprs end up in test reports
        return f"RedisServer(host={self.host!r}, port={self.port}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        """``redis://HOST:PORT/0``, no password: that comes from FEAST_REDIS_PASSWORD or a file."""
        return f"redis://{self.host}:{self.port}/0"

    def client(self, db: int = 0):
        import redis

        return redis.Redis(host=self.host, port=self.port, db=db, password=self.password)

    def start(self) -> None:
        """Start it and wait until it answers with the password."""
        import subprocess
        import time

        import redis

        lines = [f"port {self.port}", f"bind {self.host}", 'save ""', "appendonly no", f'dir "{self.folder}"']
        config = "\n".join([*lines, f'requirepass "{self.password}"', ""])
        self._process = subprocess.Popen(
            [self.binary, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._process.stdin.write(config.encode())
        self._process.stdin.close()  # redis-server reads its configuration up to the end of stdin
        client = self.client()
        try:
            for _ in range(100):
                try:
                    client.ping()
                    return
                except redis.AuthenticationError:
                    self.kill()
                    pytest.fail("redis-server refused its own password")
                except redis.ConnectionError:
                    time.sleep(0.05)
            self.kill()
            pytest.fail("redis-server did not start")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, nothing saved; returns once the process is gone."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)

    def stop(self) -> None:
        if self.running:
            self._process.terminate()
            self._process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port with a password (requirepass), stopped at the end of
    the session."""
    import secrets

    binary = installed("redis-server", package="redis-server")
    # the prefix keeps it text for Feast, which reads connection-string values as JSON where they parse
    # (hex digits alone could read as a number)
    password = "pw-" + secrets.token_hex(16)
    server = RedisServer(binary, "127.0.0.1", _free_port(), password, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server):
    """The session's Redis as one URL, password inside (``redis://:PASSWORD@HOST:PORT/0``), for tests that
    only need a working online store; tests of the password's own path use ``redis_server``."""
    from urllib.parse import quote

    return f"redis://:{quote(redis_server.password)}@{redis_server.host}:{redis_server.port}/0"


def _postgres_bin() -> str | None:
    """The folder of PostgreSQL's server binaries (initdb, pg_ctl), the newest version's, or None."""
    import glob
    import shutil
    from pathlib import Path

    def version(folder: str) -> tuple[int, str]:
        name = Path(folder).parent.name
        return (int(name) if name.isdigit() else 0, name)

    folders = [f for f in glob.glob("/usr/lib/postgresql/*/bin") if Path(f, "initdb").exists()]
    if folders:
        return max(folders, key=version)
    initdb = shutil.which("initdb")
    return str(Path(initdb).parent) if initdb else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster (initdb on a free loopback port, trust auth), with the databases
    ``mlflow`` and ``feast``; yields ``url(database) -> "postgresql+psycopg://postgres@127.0.0.1:PORT/db"``.
    Stopped and deleted at the end of the session. Skips where PostgreSQL is absent (fails under CI)."""
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    folder_bin = _postgres_bin()
    if folder_bin is None:
        message = "PostgreSQL is not installed (apt-get install postgresql): no initdb / pg_ctl"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="shopsight-pg-")  # not under pytest's 0700 tree: postgres must reach it
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.fail("running as root and there is no postgres user to run PostgreSQL as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = f"{root}/data", f"{root}/server.log"
    port = _free_port()

    def run(*command: str) -> None:
        result = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            tail = Path(log).read_text()[-2000:] if Path(log).exists() else ""
            pytest.fail(f"{Path(command[0]).name} failed: {result.stderr or result.stdout}\n{tail}")

    pg_ctl = f"{folder_bin}/pg_ctl"
    started = False
    try:
        run(f"{folder_bin}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
        run(pg_ctl, "-D", data, "-l", log, "-w", "-t", "60", "-o", options, "start")
        started = True
        for database in ("mlflow", "feast"):
            run(f"{folder_bin}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database)
        yield lambda database: f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
    finally:
        if started:
            stop = [*as_user, pg_ctl, "-D", data, "-m", "fast", "-w", "stop"]
            subprocess.run(stop, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
