"""MLflow's own authentication, for real: `shopsight mlflow up` with mlflow.auth runs `mlflow server
--app-name basic-auth` on 127.0.0.1 and a free port (stopped at the end of the module), its users made with
`shopsight mlflow user`. An unauthenticated client and a READ-only user cannot set `champion` (HTTP 401 and
403 on the wire, one clear line through shopsight naming the user and the permission), a user with EDIT
promotes and one with MANAGE rolls back, and the history and version tags name those MLflow users; a wrong
password is one line; no password is on a command line, in the server's log or in `config show`."""

from __future__ import annotations

import getpass
import secrets
import subprocess
import sys

import pytest
import requests

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]

NAME = "shopsight-next-item"
ADMIN_PASSWORD = f"admin-{secrets.token_hex(8)}"
PASSWORDS = {user: f"{user}-{secrets.token_hex(8)}" for user in ("trainer", "reader", "editor", "manager")}
LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class AuthServer:
    """test_promotion's Registry (data, how versions are registered) on a server with authentication."""

    def __init__(self, folder, port):
        from test_promotion import Registry

        from shopsight.platform import load_settings

        self.folder = folder
        self.admin_file = folder / "admin_password"
        self.admin_file.write_text(ADMIN_PASSWORD + "\n")
        self.registry = reg = Registry(folder, port)
        auth = {"mlflow.auth": "true", "mlflow.admin_password_file": str(self.admin_file)}
        reg.settings = load_settings(
            overrides={"data_dir": str(folder / "dd"), "mlflow.port": str(port), **auth}, environ={}
        ).settings
        self.options = [
            *reg.cli[3:],
            *(f for key, value in auth.items() for f in ("--set", f"{key}={value}")),
        ]
        self.uri = f"http://127.0.0.1:{port}"
        for user, password in PASSWORDS.items():  # each user's login, in MLflow's credentials format
            (folder / f"{user}.credentials").write_text(
                f"[mlflow]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = {password}\n"
            )

    def run(self, *args, user: str | None = None, input: str | None = None, env: dict | None = None):
        """A shopsight command in this process, logged in as ``user`` (its credentials file), as `main()`
        would end it (a ShopsightError becomes one error line)."""
        from typer.testing import CliRunner

        from shopsight.cli import app
        from shopsight.platform import ShopsightError, console

        login = ["--set", f"mlflow.credentials_file={self.folder / f'{user}.credentials'}"] if user else []
        width, console.width = console.width, 250
        try:
            result = CliRunner().invoke(app, [*self.options, *login, *args], input=input, env=env)
        finally:
            console.width = width
        output = result.output
        if isinstance(result.exception, ShopsightError):
            output += f"error: {result.exception}\n"
        elif result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return subprocess.CompletedProcess(args, result.exit_code, output, "")

    def register(self) -> str:
        """A trained next-item version, registered (and made challenger) by the user `trainer`."""
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(LOGIN_VARIABLES[0], "trainer")
            patch.setenv(LOGIN_VARIABLES[1], PASSWORDS["trainer"])
            return self.registry.register(trained=True)

    def model(self):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(LOGIN_VARIABLES[0], "admin")
            patch.setenv(LOGIN_VARIABLES[1], ADMIN_PASSWORD)
            return self.registry.client.get_registered_model(NAME)

    def history(self) -> list[dict]:
        from shopsight.lifecycle.registry import read_history

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(LOGIN_VARIABLES[0], "admin")
            patch.setenv(LOGIN_VARIABLES[1], ADMIN_PASSWORD)
            return read_history(self.registry.client, NAME)


@pytest.fixture(autouse=True)
def _no_ambient_login(monkeypatch):
    """Each test starts without a login in the environment (a credentials file exports one), and leaves
    the environment as it found it."""
    for name in (*LOGIN_VARIABLES, "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port):
    from shopsight.platform.mlflow_server import stop_local_server

    srv = AuthServer(tmp_path_factory.mktemp("mlflow_auth"), free_port())
    with pytest.MonkeyPatch.context() as patch:
        for name in (*LOGIN_VARIABLES, "MLFLOW_AUTH_ADMIN_PASSWORD"):
            patch.delenv(name, raising=False)
        up = srv.run("mlflow", "up")
    try:
        assert up.returncode == 0, up.stdout
        assert "MLflow basic-auth (admin user admin)" in up.stdout
        users = {  # name: (permission, scope)
            "trainer": ("EDIT", []),  # every model and experiment: it logs runs and registers versions
            "reader": ("READ", ["--model", NAME]),
            "editor": ("EDIT", ["--model", NAME]),
            "manager": ("MANAGE", ["--model", NAME]),
        }
        for user, (permission, scope) in users.items():  # the password from standard input
            added = srv.run("mlflow", "user", "add", user, "--permission", permission, *scope,
                            input=PASSWORDS[user] + "\n")  # fmt: skip
            assert added.returncode == 0 and f"Created MLflow user {user}" in added.stdout, added.stdout
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(LOGIN_VARIABLES[0], "trainer")
            patch.setenv(LOGIN_VARIABLES[1], PASSWORDS["trainer"])
            srv.registry.start()
        yield srv
    finally:
        stop_local_server(srv.registry.settings)


def _one_line_error(result) -> str:
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stdout
    return errors[0]


# --------------------------------------------------------------------------------- no server needed


def test_the_cluster_profile_turns_authentication_on_and_the_local_one_leaves_it_off():
    from shopsight.platform import ConfigError, load_settings

    assert load_settings("cluster", environ={}).settings.mlflow.auth is True
    assert load_settings("local", environ={}).settings.mlflow.auth is False
    with pytest.raises(ConfigError, match="auth_default_permission"):  # never EDIT for everyone
        load_settings(overrides={"mlflow.auth_default_permission": "EDIT"}, environ={})


def test_the_first_start_with_auth_needs_the_admin_password(tmp_path, free_port):
    from typer.testing import CliRunner

    from shopsight.cli import app

    result = CliRunner().invoke(
        app, ["--data-dir", str(tmp_path / "dd"), "--set", f"mlflow.port={free_port()}",
              "--set", "mlflow.auth=true", "mlflow", "up"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "creates its admin 'admin'" in str(result.exception)
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in str(result.exception)
    assert not (tmp_path / "dd" / "mlflow" / "server.json").exists()  # nothing was started


# -------------------------------------------------------------------------------------- real server


def test_unauthenticated_and_read_only_clients_cannot_set_champion(server):
    version = server.register()
    alias = {"name": NAME, "alias": "champion", "version": version}
    # on the wire: the attacker's POST, then a READ-only user's
    denied = requests.post(f"{server.uri}/api/2.0/mlflow/registered-models/alias", json=alias, timeout=30)
    assert denied.status_code == 401
    denied = requests.post(
        f"{server.uri}/api/2.0/mlflow/registered-models/alias", json=alias, timeout=30,
        auth=("reader", PASSWORDS["reader"]),
    )  # fmt: skip
    assert denied.status_code == 403
    # through shopsight: no login at all
    error = _one_line_error(server.run("models", "promote", NAME))
    assert "needs a login (mlflow.auth is on)" in error and "MLFLOW_TRACKING_USERNAME" in error
    # a profile that does not know the server has authentication: the local server's record says so
    error = _one_line_error(server.run("--set", "mlflow.auth=false", "models", "promote", NAME))
    assert "runs with authentication: set mlflow.auth=true" in error
    # ... and a shared server (tracking_uri) answers HTTP 401, turned into the same advice
    remote = ["--set", f"mlflow.tracking_uri={server.uri}", "--set", "mlflow.auth=false"]
    error = _one_line_error(server.run(*remote, "models", "promote", NAME))
    assert "HTTP 401" in error and "set mlflow.auth=true" in error
    # the READ-only user: refused before any evaluation, naming the user and what it has and needs
    error = _one_line_error(server.run("models", "promote", NAME, user="reader"))
    assert "MLflow user 'reader' has READ on registered model shopsight-next-item" in error
    assert "needs EDIT or MANAGE" in error
    model = server.model()
    assert "champion" not in model.aliases and server.history() == []
    assert "promotion.lock" not in model.tags  # the refusal came before the lock
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LOGIN_VARIABLES[0], "admin")
        patch.setenv(LOGIN_VARIABLES[1], ADMIN_PASSWORD)
        assert "gate.status" not in server.registry.client.get_model_version(NAME, version).tags


def test_a_wrong_password_is_one_clear_line(server):
    wrong = {LOGIN_VARIABLES[0]: "editor", LOGIN_VARIABLES[1]: "not-the-password"}
    error = _one_line_error(server.run("models", "promote", NAME, env=wrong))
    assert "refused the login of user 'editor' (from MLFLOW_TRACKING_USERNAME)" in error
    assert "wrong password or no such user" in error and "not-the-password" not in error
    # the command as a user runs it: its own process, the error printed by main()
    process = subprocess.run(
        [sys.executable, "-m", "shopsight", *server.options, "models", "history", NAME],
        capture_output=True, text=True, timeout=300, env={**server.registry.env, **wrong},
    )  # fmt: skip
    assert process.returncode == 1 and "Traceback" not in process.stderr, process.stderr
    (line,) = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert "refused the login of user 'editor'" in line
    # the admin's password, wrong (from the variable: no password file), for `mlflow user`
    granting = server.run(
        "--set", "mlflow.admin_password_file=", "mlflow", "user", "grant", "reader", "--permission", "EDIT",
        env={"MLFLOW_AUTH_ADMIN_PASSWORD": "not-the-admin-password"},
    )  # fmt: skip
    assert "refused the login of admin 'admin'" in _one_line_error(granting)


def test_an_editor_promotes_and_the_history_names_the_mlflow_user(server):
    version = server.model().aliases.get("challenger")
    result = server.run("models", "promote", NAME, user="editor")
    assert result.returncode == 0, result.stdout
    model = server.model()
    assert model.aliases["champion"] == version
    (entry,) = server.history()
    assert entry["action"] == "promote" and entry["to"] == version
    assert entry["by"] == "editor" != getpass.getuser()  # the MLflow user, not the Unix login
    assert model.tags["eval.frozen_by"] == "editor"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(LOGIN_VARIABLES[0], "admin")
        patch.setenv(LOGIN_VARIABLES[1], ADMIN_PASSWORD)
        assert server.registry.client.get_model_version(NAME, version).tags["promoted_by"] == "editor"
    history = server.run("models", "history", NAME, user="reader")  # READ is enough to look
    assert history.returncode == 0 and "editor" in history.stdout, history.stdout


def test_a_manager_rolls_back_and_is_named(server):
    first = server.model().aliases["champion"]
    second = server.register()
    promoted = server.run("models", "promote", NAME, user="editor")
    assert promoted.returncode == 0, promoted.stdout
    assert server.model().aliases["champion"] == second
    rolled = server.run("models", "rollback", NAME, "--reason", "drill", user="manager")
    assert rolled.returncode == 0, rolled.stdout
    assert server.model().aliases["champion"] == first
    entry = server.history()[-1]
    assert entry["action"] == "rollback" and entry["by"] == "manager" and entry["to"] == first
    # a READ-only user cannot roll back either
    error = _one_line_error(server.run("models", "rollback", NAME, user="reader"))
    assert "MLflow user 'reader' has READ" in error
    assert server.model().aliases["champion"] == first


def test_user_management_errors_are_one_line(server):
    short = server.run("mlflow", "user", "add", "shorty", input="short\n")
    assert "at least 12 characters" in _one_line_error(short)
    again = server.run("mlflow", "user", "add", "reader", input=PASSWORDS["reader"] + "\n")
    assert "already exists" in _one_line_error(again)
    unknown = server.run("mlflow", "user", "grant", "nobody", "--permission", "EDIT")
    assert "no MLflow user 'nobody'" in _one_line_error(unknown)
    granted = server.run("mlflow", "user", "grant", "reader", "--permission", "READ", "--model", NAME)
    assert granted.returncode == 0 and "now has READ" in granted.stdout  # an existing grant is replaced


def test_no_password_on_a_command_line_in_the_log_or_in_config_show(server):
    import json

    import psutil

    folder = server.folder / "dd" / "mlflow"
    record = json.loads((folder / "server.json").read_text())
    assert record["auth"] is True
    group = psutil.Process(record["pid"])
    processes = [group, *group.children(recursive=True)]
    command_lines = " ".join(" ".join(p.cmdline()) for p in processes)
    assert "--app-name basic-auth" in command_lines
    log = (folder / "server.log").read_text()
    shown = server.run("config", "show", user="editor").stdout
    for password in (ADMIN_PASSWORD, *PASSWORDS.values()):
        assert password not in command_lines and password not in log and password not in shown
    config = (folder / "basic_auth.ini").read_text()
    assert "default_permission = READ" in config and ADMIN_PASSWORD not in config
    assert (folder / "basic_auth.ini").stat().st_mode & 0o077 == 0
    assert (folder / "flask_secret_key").stat().st_mode & 0o077 == 0
