"""The Ray cluster of a profile: where jobs go, and the local head of the ``local`` profile.

``local``: ``shopsight cluster up`` starts a Ray head on this machine (``ray start --head`` on 127.0.0.1,
token authentication on) that outlives the command and is reused by later commands; its addresses are kept
in ``<data_dir>/ray/head.json``. ``cluster``: ``ray.address`` is the cluster's jobs API
(``http://head:8265``), and ``ray.auth_token_path`` the file holding its token.

Ray 2.60 authenticates with a token: a Ray process joins a token-protected cluster only when
``RAY_AUTH_MODE=token`` is in its environment and it finds the token (``RAY_AUTH_TOKEN_PATH``); an HTTP
client of the Jobs API sends it as a bearer header.

Loopback only. Ray decides where each of a node's servers listens from the node's IP: 127.0.0.1 binds the
GCS, the raylet (node manager, object manager), core workers, the dashboard agent (gRPC, HTTP, Prometheus
metrics), the runtime-env agent, the Ray client server and the metrics servers of the dashboard and the
autoscaler to 127.0.0.1, any other IP binds them to every interface (``0.0.0.0`` / ``::``). But ``ray start
--node-ip-address=127.0.0.1`` and ``ray.init(_node_ip_address="127.0.0.1")`` replace a loopback address with
the machine's routable IP (``ray._private.services.resolve_ip_for_localhost``), and so does every client
given the address ``127.0.0.1:PORT`` (``ray start --address``, ``ray.init(address=...)``), unless Ray takes
multi-node clusters to be off: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's own default on macOS and
Windows; :data:`_LOOPBACK_ENV`). It is in the environment of the head, of the private cluster of
:func:`connect` and of the worker nodes of :func:`start_worker_node` (so every Ray process they start,
workers and job drivers included, inherits it), and in force while :func:`join_head` connects. Ray has no
bind-address setting of its own (no ``RAY_*`` config, ``_system_config`` key or ``ray start`` option), and
three of the listeners are Prometheus endpoints that answer without the token: loopback is their only guard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shopsight.platform._errors import ShopsightError
from shopsight.platform._logs import engine_output_shown
from shopsight.platform._settings import Settings

_START_TIMEOUT_S = 180

# Makes Ray keep a loopback node IP and head address (see the module docstring). Its side effect: a plain
# `ray start --address` with it aborts ("Multi-node Ray clusters are not supported on Windows and OSX"), and
# without it cannot reach a loopback head: start_worker_node runs `ray start` through _JOIN_SCRIPT.
_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# `ray start` for a worker node joining a loopback head: Ray's CLI, with the check that refuses a worker
# node while multi-node clusters are off lifted, and 127.0.0.1 (the head's address, this node's IP) kept as
# given. The processes it starts get _LOOPBACK_ENV from its environment.
_JOIN_SCRIPT = """
import sys
from ray._private import ray_constants, services
ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


@dataclass(frozen=True)
class Head:
    """A running Ray head: the GCS address workers join and the dashboard that takes jobs."""

    gcs_address: str  # 127.0.0.1:6379: `ray start --address` / ray.init
    dashboard_url: str  # http://127.0.0.1:8265: the Jobs API
    token_path: str
    started_by: str


def token_path(settings: Settings) -> Path:
    """The token file: ``ray.auth_token_path``, or, in the local profile, one under ``data_dir``."""
    if settings.ray.auth_token_path:
        return Path(settings.ray.auth_token_path).expanduser()
    return Path(settings.data_dir).absolute() / "ray" / "auth_token"


def read_token(path: Path) -> str:
    if not path.is_file():
        raise ShopsightError(
            f"the Ray token file {path} does not exist: copy the cluster's token there "
            "(`ray get-auth-token` on the head prints it) or set ray.auth_token_path"
        )
    return path.read_text().strip()


def token_env(path: Path) -> dict[str, str]:
    """Environment that makes a Ray process (``ray start``, ``ray.init``) use the token in ``path``."""
    read_token(path)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


@dataclass(frozen=True)
class JobsEndpoint:
    """A Ray dashboard (the Jobs API, Serve's REST API), with the header that authenticates to it."""

    address: str
    headers: dict[str, str]
    token_path: str = ""  # the file the token came from (or would come from): named when it is refused

    def client(self):
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        try:
            return JobSubmissionClient(self.address, headers=self.headers)
        except AuthenticationError as exc:  # the server answered 401 (no token) or 403 (a wrong one)
            # Ray's message starts "Authentication required" for a 401 and "Authentication failed" for a 403
            status = 401 if str(exc).startswith("Authentication required") else 403
            raise ShopsightError(self._refused(status)) from None
        except Exception as exc:  # noqa: BLE001 - connection and HTTP errors all mean: cannot submit
            raise ShopsightError(
                f"cannot reach the Ray cluster at {self.address}: {_first_line(exc)}"
            ) from None

    def get_json(self, path: str, timeout_s: float = 30) -> dict:
        """``GET address + path`` with the token header: the decoded JSON body.

        Raises:
            ShopsightError: unreachable, a refused token (HTTP 401/403, as ``invalid token``), another
                HTTP error, or a body that is not JSON.
        """
        import requests

        url = f"{self.address}{path}"
        try:
            response = requests.get(url, headers=self.headers, timeout=timeout_s)
        except requests.RequestException as exc:
            raise ShopsightError(
                f"cannot reach the Ray cluster at {self.address}: {_first_line(exc)}"
            ) from None
        if response.status_code in (401, 403):
            raise ShopsightError(self._refused(response.status_code))
        if response.status_code != 200:
            body = " ".join(response.text.split())[:300]
            raise ShopsightError(f"the Ray dashboard at {url} answered HTTP {response.status_code}: {body}")
        try:
            return response.json()
        except ValueError:
            raise ShopsightError(f"the Ray dashboard at {url} did not answer with JSON") from None

    def _refused(self, status: int) -> str:
        where = self.token_path or "ray.auth_token_path"
        if not self.headers:
            return (
                f"invalid token: the Ray cluster at {self.address} requires a token and none was sent "
                f"(HTTP {status}): put the cluster's token in {where} or set ray.auth_token_path "
                "(`ray get-auth-token` on the head prints it)"
            )
        return (
            f"invalid token: the Ray cluster at {self.address} refused the token in {where} (HTTP {status}): "
            "copy the cluster's token there (`ray get-auth-token` on the head prints it)"
        )


def dashboard_endpoint(settings: Settings, address: str) -> JobsEndpoint:
    """The Ray dashboard at ``address`` (``http://HEAD:8265``), with the token of ``ray.auth_token_path``
    when that file exists (a cluster without token authentication takes requests without one).

    Raises:
        ShopsightError: ``address`` is no http(s) URL, or ``ray.auth_token_path`` names a missing file.
    """
    if not address.startswith(("http://", "https://")):
        raise ShopsightError(
            f"{address!r} is not a Ray dashboard URL: jobs and Serve's REST API are on the head's "
            "dashboard, http://HEAD:8265"
        )
    path = token_path(settings)
    headers = {"Authorization": f"Bearer {read_token(path)}"} if path.exists() else {}
    if settings.ray.auth_token_path and not headers:
        read_token(path)  # a configured token file that is missing is an error, not "no auth"
    return JobsEndpoint(address.rstrip("/"), headers, str(path))


def jobs_endpoint(settings: Settings) -> JobsEndpoint:
    """The Jobs API of the profile's cluster: ``ray.address``, or the local head (which must be up).

    The token goes in an explicit ``Authorization`` header rather than the process environment, so one
    process can talk to several clusters and leaves Ray's own process-wide token cache alone.
    """
    if settings.ray.address:
        address = settings.ray.address
        if not address.startswith(("http://", "https://")):
            raise ShopsightError(
                f"ray.address {address!r} is not a jobs API URL: jobs go to the head's dashboard, "
                "http://HEAD:8265"
            )
        return dashboard_endpoint(settings, address)
    head = local_head(settings)
    if head is None:
        raise ShopsightError("no local Ray head is running: start one with `shopsight cluster up`")
    headers = {"Authorization": f"Bearer {read_token(Path(head.token_path))}"}
    return JobsEndpoint(head.dashboard_url, headers, head.token_path)


def connect(settings: Settings) -> None:
    """``ray.init`` for a command that runs Ray work from this process (train, tune).

    Inside a submitted job Ray has set ``RAY_ADDRESS``: join that cluster. In the local profile, join the
    head of `shopsight cluster up` when it runs, else start a private one for this command only. A
    ``cluster`` profile's jobs URL cannot be joined from outside: such work goes through `jobs submit`.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    if settings.ray.address:
        raise ShopsightError(
            f"ray.address is {settings.ray.address}: run this on the cluster with "
            "`shopsight jobs submit ...` (or from a Ray job)"
        )
    # what the workers print besides their lines for the user (runtime/feed.py) is Ray's and torch's: in
    # Ray's logs, and on the console only with -v
    forward = engine_output_shown()
    head = local_head(settings)
    if head is not None:
        join_head(head, log_to_driver=forward)
        return
    # the dashboard also serves the State API that Ray Train's placement-group cleaner polls; every server
    # of this private cluster listens on 127.0.0.1 only (the module docstring says how)
    with _loopback_only():
        ray.init(
            num_cpus=settings.ray.num_cpus,
            include_dashboard=True,
            _node_ip_address="127.0.0.1",
            _temp_dir=str(ray_temp_dir(settings)),
            log_to_driver=forward,
        )


@contextlib.contextmanager
def _loopback_only():
    """While ``ray.init`` starts a private cluster or joins a loopback head: Ray keeps a loopback node IP or
    head address in this process (its constant was read at import), and the processes it starts (GCS,
    raylet and, through the raylet, every worker; dashboard, agents) inherit the environment that keeps it,
    with free ports for the metrics servers of the dashboard and the autoscaler (Ray's fixed defaults may be
    another cluster's)."""
    from ray._private import ray_constants

    env = {**_LOOPBACK_ENV, **_metrics_ports_env()}
    saved_env = {key: os.environ.get(key) for key in env}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _metrics_ports_env() -> dict[str, str]:
    return {"DASHBOARD_METRIC_PORT": str(_free_port()), "AUTOSCALER_METRIC_PORT": str(_free_port())}


def join_head(head: Head, **init_options) -> None:
    """``ray.init`` this process into a head started by :func:`start_local_head`, with its token."""
    import ray

    _use_token_in_this_process(Path(head.token_path))
    with _loopback_only():  # else Ray turns 127.0.0.1:PORT into the machine's IP, where the head is not
        ray.init(address=head.gcs_address, **init_options)


def _use_token_in_this_process(path: Path) -> None:
    """Token auth for this process's own Ray client. Ray reads RAY_AUTH_MODE into its config when it is
    imported, and caches the token on first use: both are refreshed, as Ray's own ``ray start`` does."""
    os.environ.update(token_env(path))
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def ray_temp_dir(settings: Settings) -> Path:
    """Ray's session folder for this data directory's Ray (the local head, or a command's private one).

    With Ray's default, ``/tmp/ray``, two data directories on one machine share one folder, and a Ray
    process that looks for "the" local cluster finds the other directory's ("Found multiple active Ray
    instances ... Connecting to latest"). It cannot live under the data directory itself: Ray keeps Unix
    sockets inside it, and a socket path is limited to 107 bytes, so it is a short folder named after the
    data directory's path.
    """
    digest = hashlib.sha256(str(Path(settings.data_dir).absolute()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"shopsight-ray-{digest}"


def _state_file(settings: Settings) -> Path:
    return Path(settings.data_dir).absolute() / "ray" / "head.json"


def local_head(settings: Settings) -> Head | None:
    """The local head this data directory started, if it still answers."""
    state = _state_file(settings)
    if not state.exists():
        return None
    head = Head(**json.loads(state.read_text()))
    return head if _dashboard_up(head.dashboard_url) else None


def start_local_head(settings: Settings, started_by: str = "shopsight cluster up") -> tuple[Head, bool]:
    """Start the local profile's Ray head, or return the running one; returns (head, started now)."""
    if settings.ray.address:
        raise ShopsightError(
            f"ray.address is {settings.ray.address}: this profile uses that cluster, not a local head"
        )
    running = local_head(settings)
    if running:
        return running, False
    for port in (settings.ray.head_port, settings.ray.dashboard_port):
        if _port_in_use(port):
            raise ShopsightError(
                f"port {port} on 127.0.0.1 is taken by another process (another Ray head?): stop it, or set "
                "ray.head_port / ray.dashboard_port to free ports"
            )
    token = token_path(settings)
    if not token.exists():
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    command = [
        _ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1",
        f"--port={settings.ray.head_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={settings.ray.dashboard_port}", "--disable-usage-stats",
        # ports Ray would otherwise fix (another cluster on this machine may hold them)
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--resources={json.dumps(settings.ray.head_resources)}", f"--temp-dir={ray_temp_dir(settings)}",
    ]  # fmt: skip
    if settings.ray.num_cpus:
        command.append(f"--num-cpus={settings.ray.num_cpus}")
    # --node-ip-address=127.0.0.1 alone is replaced by the machine's IP: _LOOPBACK_ENV keeps it (docstring)
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=_START_TIMEOUT_S, env=_node_env(token)
    )
    if result.returncode != 0:
        raise ShopsightError(f"`ray start --head` failed: {(result.stderr or result.stdout).strip()[-800:]}")
    head = Head(
        gcs_address=f"127.0.0.1:{settings.ray.head_port}",
        dashboard_url=f"http://127.0.0.1:{settings.ray.dashboard_port}",
        token_path=str(token),
        started_by=started_by,
    )
    deadline = time.time() + 60
    while not _dashboard_up(head.dashboard_url):
        if time.time() > deadline:
            raise ShopsightError(
                f"the Ray head started but its dashboard {head.dashboard_url} does not answer"
            )
        time.sleep(0.5)
    state = _state_file(settings)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(asdict(head)) + "\n")
    return head, True


def stop_local_head(settings: Settings) -> bool:
    """Stop the local head this data directory started (only its processes, not other Ray clusters)."""
    state = _state_file(settings)
    if not state.exists():
        return False
    head = Head(**json.loads(state.read_text()))
    state.unlink()
    port = head.gcs_address.rsplit(":", 1)[1]
    killed = kill_ray_processes(port)
    # `ray start` left its address for ray.init() to find: a later ray.init() would try to join the dead head
    current = ray_temp_dir(settings) / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    return killed > 0


def kill_ray_processes(gcs_port: str | int, node_manager_port: int | None = None) -> int:
    """Kill the Ray processes of one cluster (by its GCS port), or of one node of it (by its raylet's
    ``node_manager_port``) with every process the raylet started. ``ray stop`` would kill every Ray
    process on the machine, other clusters included. Returns how many processes were signalled."""
    import re

    import psutil

    mark = (
        re.compile(rf"--node[-_]manager[-_]port={node_manager_port}\b")
        if node_manager_port
        else re.compile(
            rf"(--gcs_server_port={gcs_port}|--gcs-address=\S+:{gcs_port}|--address=\S+:{gcs_port})\b"
        )
    )
    victims: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.pid != os.getpid() and mark.search(cmdline):
            victims[process.pid] = process
            with contextlib.suppress(psutil.Error):
                victims.update({child.pid: child for child in process.children(recursive=True)})
    victims.pop(os.getpid(), None)
    for process in victims.values():
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(list(victims.values()), timeout=10)
    return len(victims)


def _node_env(token: Path) -> dict[str, str]:
    """A node's environment: token auth on, this interpreter's folder first on PATH (so the ``python`` of a
    job's entrypoint is this environment's, with Shopsight's dependencies), every server on loopback
    (:data:`_LOOPBACK_ENV`), and free ports for the Prometheus servers of the dashboard (Ray's default
    44227) and the autoscaler (44217): Ray fixes them and only logs an error when another cluster on this
    machine holds them."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **token_env(token), "PATH": path, **_LOOPBACK_ENV, **_metrics_ports_env()}


def _ray_cli() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def _dashboard_up(url: str) -> bool:
    import requests

    try:
        return requests.get(f"{url}/api/version", timeout=3).status_code in (200, 401, 403)
    except requests.RequestException:
        return False


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def storage_path(settings: Settings) -> str:
    """Where Ray Train and Tune keep checkpoints and results: ``ray.storage_path`` (a path every node
    sees, or ``s3://...``), else ``<data_dir>/ray_results``."""
    if settings.ray.storage_path:
        path = settings.ray.storage_path
        return path if "://" in path else str(Path(path).expanduser().absolute())
    return str(Path(settings.data_dir).absolute() / "ray_results")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class WorkerNode:
    """A Ray worker node started on this machine: its raylet port identifies it (kill_ray_processes)."""

    node_manager_port: int
    temp_dir: str


def start_worker_node(head: Head, num_cpus: int, resources: dict[str, float]) -> WorkerNode:
    """Join another node to the local head on this machine (tests and benchmarks of multi-node runs).

    It gets its own short temp dir: nodes sharing one would share (and clean up) each other's runtime-env
    folders, and Ray's unix socket paths below it may not exceed 107 bytes. Like the head, it listens on
    127.0.0.1 only and registers that as its IP (the module docstring says how; ``_JOIN_SCRIPT``).
    """
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="shopsight-ray-", dir="/tmp")
    command = [
        sys.executable, "-c", _JOIN_SCRIPT, "start", f"--address={head.gcs_address}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}", f"--node-manager-port={port}",
        f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    env = _node_env(Path(head.token_path))
    result = subprocess.run(command, capture_output=True, text=True, timeout=_START_TIMEOUT_S, env=env)
    if result.returncode != 0:
        shutil.rmtree(temp_dir, ignore_errors=True)
        reason = (result.stderr or result.stdout).strip()[-800:]
        raise ShopsightError(f"`ray start --address` failed: {reason}")
    return WorkerNode(port, temp_dir)


def stop_worker_node(node: WorkerNode, remove: bool = True) -> int:
    """Kill a worker node's raylet and every process it started (as a machine failure would)."""
    killed = kill_ray_processes(0, node_manager_port=node.node_manager_port)
    if remove:
        shutil.rmtree(node.temp_dir, ignore_errors=True)
    return killed
