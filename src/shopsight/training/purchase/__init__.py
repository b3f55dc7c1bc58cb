"""The purchase task: will the user buy anything on the day after the snapshot (label ``buy_next_1d``)?

A binary prediction on user snapshots, trained, calibrated, evaluated and served by the shared code of
:mod:`shopsight.training.binary`; what is particular to it is its entry in
:data:`shopsight.training.tasks.TASKS` and the simulator's oracle named here.
"""

from __future__ import annotations

from shopsight.training import binary

ORACLE_FILE = "next_day_buy.parquet"  # under the simulation's truth/ folder
ORACLE_COLUMN = "p_buy_next_day"  # the true probability of the label, per user and snapshot day

check_data, loop, prepare, evaluate, evaluate_version, paired_difference = binary.task_hooks("purchase")
