"""The Spark feature build as the driver of a spark-operator SparkApplication.

spark-submit runs this file with the image's Python (``local:///opt/shopsight/infra/spark/build_features.py``)
and its arguments are those of ``shopsight features build`` (``--events``, ``--start``, ``--end``, ...).
The build runs in this process, so its Spark session is the one spark-submit prepared: the master and the
Kubernetes settings it was submitted with, executors as pods of the same image. Two settings therefore come
from the submission rather than the profile, passed as ``--set`` (the CLI's highest precedence):

* ``spark.master``: the master spark-submit was given (``k8s://https://...`` under spark-operator);
* ``spark.bind_address``: the driver pod's IP (``SPARK_DRIVER_BIND_ADDRESS``), which the executors dial
  back to; the profile's loopback default would leave them unable to reach the driver.

The Spark UI and the event log are the submission's too (the SparkApplication's ``sparkConf``): the
session keeps them, and the event log folder on the shared volume is created here before Spark needs it,
for the history server (infra/k8s/base/spark-history-server.yaml) to read.

It imports only the installed ``shopsight`` package, never a file beside it (the image sets
``PYTHONSAFEPATH=1``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse


def submitted_settings(conf: dict[str, str] | None = None) -> list[str]:
    """``--set`` options for the settings that spark-submit, not the profile, decides."""
    from shopsight.features._spark import submitted_conf

    conf = submitted_conf() if conf is None else conf
    options: list[str] = []
    master = conf.get("spark.master")
    if master:
        options += ["--set", f"spark.master={master}"]
    bind_address = os.environ.get("SPARK_DRIVER_BIND_ADDRESS")
    if bind_address:
        options += ["--set", f"spark.bind_address={bind_address}"]
    return options


def prepare_event_log(conf: dict[str, str]) -> Path | None:
    """Create the event log folder the submission names, if it is a local path (the shared volume).

    Spark will not start a context whose ``spark.eventLog.dir`` is missing, and on a fresh volume nothing
    else has made it: the history server only reads it. Returns the folder made sure of, if any.
    """
    if conf.get("spark.eventLog.enabled", "false").strip().lower() != "true":
        return None
    location = urlparse(conf.get("spark.eventLog.dir", "file:/tmp/spark-events"))  # Spark's default
    if location.scheme not in ("", "file"):
        return None  # object storage has no folders to create
    folder = Path(location.path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def main() -> None:
    from shopsight.cli import main as shopsight
    from shopsight.features._spark import submitted_conf

    conf = submitted_conf()
    prepare_event_log(conf)
    sys.argv = ["shopsight", *submitted_settings(conf), "features", "build", *sys.argv[1:]]
    shopsight()


if __name__ == "__main__":
    main()
