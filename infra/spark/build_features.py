"""The Spark feature build as the driver of a spark-operator SparkApplication.

spark-submit runs this file with the image's Python (``local:///opt/shopsight/infra/spark/build_features.py``)
and its arguments are those of ``shopsight features build`` (``--events``, ``--start``, ``--end``, ...).
The build runs in this process, so its Spark session is the one spark-submit prepared: the master and the
Kubernetes settings it was submitted with, executors as pods of the same image. Two settings therefore come
from the submission rather than the profile, passed as ``--set`` (the CLI's highest precedence):

* ``spark.master``: the master spark-submit was given (``k8s://https://...`` under spark-operator);
* ``spark.bind_address``: the driver pod's IP (``SPARK_DRIVER_BIND_ADDRESS``), which the executors dial
  back to; the profile's loopback default would leave them unable to reach the driver.

It imports only the installed ``shopsight`` package, never a file beside it (the image sets
``PYTHONSAFEPATH=1``).
"""

from __future__ import annotations

import os
import sys


def submitted_settings() -> list[str]:
    """``--set`` options for the settings that spark-submit, not the profile, decides."""
    options: list[str] = []
    if "PYSPARK_GATEWAY_PORT" in os.environ:  # started by spark-submit: its JVM holds the submitted conf
        from pyspark import SparkConf, SparkContext

        SparkContext._ensure_initialized()
        master = SparkConf().get("spark.master", None)
        if master:
            options += ["--set", f"spark.master={master}"]
    bind_address = os.environ.get("SPARK_DRIVER_BIND_ADDRESS")
    if bind_address:
        options += ["--set", f"spark.bind_address={bind_address}"]
    return options


def main() -> None:
    from shopsight.cli import main as shopsight

    sys.argv = ["shopsight", *submitted_settings(), "features", "build", *sys.argv[1:]]
    shopsight()


if __name__ == "__main__":
    main()
