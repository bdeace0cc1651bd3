"""Where a grid's cells run. The scheduler (launch/studies/scheduler.py) decides what starts next and keeps
grid.json; an executor (the `Executor` protocol, base.py) gives a cell a place and runs it there, whole:

- `Machine` (local.py; `ftctl grid --jobs N`, the default with N = 1): this machine, N cells at a time;
- `RayCluster` (ray_cluster.py; `ftctl grid --executor ray [--ray-address ADDR]`): each cell one Ray task.

Both run a cell as the same commands (`cell_command`, `evaluate_command`): what a grid computes does not depend on
where it ran.
"""

from launch.studies.executors.base import (
    RETRIES,
    CellJob,
    CellRun,
    Executor,
    Need,
    Outcome,
    ProcessJob,
    cell_command,
    evaluate_command,
    free_port,
    killed,
    resume_flag,
    tail,
)
from launch.studies.executors.local import Machine, Slot
from launch.studies.executors.ray_cluster import RayCluster

__all__ = [
    "RETRIES",
    "CellJob",
    "CellRun",
    "Executor",
    "Machine",
    "Need",
    "Outcome",
    "ProcessJob",
    "RayCluster",
    "Slot",
    "cell_command",
    "evaluate_command",
    "free_port",
    "killed",
    "resume_flag",
    "tail",
]
