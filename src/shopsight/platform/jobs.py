"""Shopsight work as Ray jobs: what a submission ships, and how its state is read back.

A job runs ``python -m shopsight --config shopsight-settings.yaml <command> [options]`` on the cluster's
head. It ships:

- the ``shopsight`` package as a ``py_modules`` entry (the code of this checkout, never a ``working_dir`` at
  ``src/shopsight``: Ray would put the folder's *contents* on the path and ``import shopsight`` would break);
- a ``working_dir`` holding only ``shopsight-settings.yaml``: the submitting profile's settings, resolved, so
  the job runs with exactly what ``shopsight config show`` printed here (less what only makes sense on this
  machine: the jobs address, the local head's CPU count).

The cluster's own environment (its image, or this machine's virtualenv for the local head) provides the
dependencies.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

import shopsight
from shopsight.platform._errors import ShopsightError
from shopsight.platform._settings import PROFILES, Settings
from shopsight.platform.ray_cluster import JobsEndpoint

SETTINGS_FILE = "shopsight-settings.yaml"
# job kind -> the shopsight command it runs
KINDS: dict[str, tuple[str, ...]] = {
    "features": ("features", "build"),
    "materialize": ("features", "materialize"),
    "train": ("train",),
    "tune": ("tune",),
    "evaluate": ("evaluate",),
    # the gate reads the frozen evaluation set from data_dir, which on a cluster is the cluster's volume
    "promote": ("models", "promote"),
    "monitor": ("monitor",),
}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_settings(settings: Settings, local_cluster: bool) -> dict:
    """The settings a job runs with: the submitter's, minus this machine's connection details.

    On a local head the job shares this machine's files, so ``data_dir`` becomes absolute; on a remote
    cluster a relative ``data_dir`` means nothing, and the cluster's own (environment or default) applies.
    """
    values = settings.model_dump(mode="json")
    values["ray"].update(address=None, num_cpus=None)  # inside a job Ray provides RAY_ADDRESS
    if values["profile"] not in PROFILES:  # a user's own profile is defined on this machine only
        values.pop("profile")  # and the file holds its values anyway
    if local_cluster:
        values["data_dir"] = str(Path(settings.data_dir).absolute())
    elif not Path(settings.data_dir).is_absolute():
        values.pop("data_dir")
    return values


@dataclass(frozen=True)
class Submission:
    job_id: str
    entrypoint: str


def submit(
    endpoint: JobsEndpoint,
    kind: str,
    args: list[str],
    settings: Settings,
    *,
    local_cluster: bool,
    entrypoint_num_cpus: float = 0,
) -> Submission:
    """Submit ``shopsight <KINDS[kind]> args`` to the cluster; returns the job id."""
    import shlex

    if kind not in KINDS:
        raise ShopsightError(f"unknown job kind {kind!r}: one of {', '.join(KINDS)}")
    command = ["python", "-m", "shopsight", "--config", SETTINGS_FILE, *KINDS[kind], *args]
    entrypoint = shlex.join(command)
    job_id = f"shopsight-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    client = endpoint.client()
    with tempfile.TemporaryDirectory(prefix="shopsight-job-") as folder:
        (Path(folder) / SETTINGS_FILE).write_text(yaml.safe_dump(job_settings(settings, local_cluster)))
        runtime_env = {
            "working_dir": folder,
            "py_modules": [str(Path(shopsight.__file__).parent)],
            # log lines reach `jobs logs --follow` as they happen, and tables are not squeezed to 80 columns
            "env_vars": {"PYTHONUNBUFFERED": "1", "COLUMNS": "160"},
        }
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={"shopsight_kind": kind, "shopsight_profile": settings.profile},
                entrypoint_num_cpus=entrypoint_num_cpus,
            )
        except Exception as exc:  # noqa: BLE001 - HTTP/auth/runtime-env errors: one clear line
            reason = _reason(exc)
            raise ShopsightError(f"the cluster at {endpoint.address} refused the job: {reason}") from None
    return Submission(job_id, entrypoint)


def job_info(endpoint: JobsEndpoint, job_id: str):
    try:
        return endpoint.client().get_job_info(job_id)
    except ShopsightError:
        raise
    except Exception as exc:  # noqa: BLE001
        reason = _reason(exc)
        raise ShopsightError(f"no job {job_id!r} on the cluster at {endpoint.address}: {reason}") from None


def wait(endpoint: JobsEndpoint, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0):
    """Wait until the job ends (or ``timeout_s`` passes); returns its last info."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        info = job_info(endpoint, job_id)
        if str(info.status) in TERMINAL or (deadline is not None and time.time() > deadline):
            return info
        time.sleep(poll_s)


def log_tail(endpoint: JobsEndpoint, job_id: str, lines: int = 20) -> str:
    logs = endpoint.client().get_job_logs(job_id)
    return "\n".join(logs.rstrip().splitlines()[-lines:])


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return " ".join(lines[:3])[:500]
