"""The churn task: will the user go quiet, with no event at all in the 3 days after the snapshot
(label ``churn_3d``, from the feature jobs and the Feast ``labels`` view; snapshots whose 3 days are not
all observed yet have no label and are left out)?

A binary prediction on user snapshots, trained, calibrated, evaluated and served by the shared code of
:mod:`shopsight.training.binary`; what is particular to it is its entry in
:data:`shopsight.training.tasks.TASKS` and the simulator's oracle named here (dormancy is part of the
simulator, so each user and day has a true churn probability).
"""

from __future__ import annotations

from shopsight.training import binary

ORACLE_FILE = "churn_3d.parquet"  # under the simulation's truth/ folder
ORACLE_COLUMN = "p_churn_3d"  # the true probability of the label, per user and snapshot day

check_data, loop, prepare, evaluate, evaluate_version, paired_difference = binary.task_hooks("churn")
