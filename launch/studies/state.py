"""What a grid keeps on disk about itself: the layout of its directory, `grid.json` (rewritten atomically after
every step: the spec, the executor, each cell's state, attempts, where it ran and its headline numbers), and the one
line that says why a cell failed."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

from launch.run import rundir
from launch.studies.executors import Need, tail
from launch.studies.spec import DONE, EXCLUDED, REFUSED, Cell, GridSpec
from tasks import TASKS

GRID_FILE = "grid.json"
SPEC_COPY = "grid.yaml"
CONFIGS = "configs"
LOGS = "logs"
EVAL_FILE = "eval.json"


def failure_line(log: Path, code: int) -> str:
    """The one line that says why a cell's process failed: its `error:` line, else the last exception line."""
    lines = [line.strip() for line in tail(log, 65536) if line.strip()]
    for prefix in ("error: ", "stopped: ", "failed: "):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[-1][len(prefix) :]
    exceptions = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line)]
    if exceptions:
        return exceptions[-1]
    return f"exit code {code}; see {log}"


def has_baseline(grid_dir: Path, cell: Cell) -> bool:
    path = grid_dir / cell.id / EVAL_FILE
    return path.is_file() and "baseline" in rundir.read_json(path, "evaluation")


def summary(grid_dir: Path, cell: Cell, baselines: dict[str, str]) -> dict[str, Any]:
    """The cell's headline numbers for grid.json and the live table (the report has them all)."""
    record = rundir.read_json(grid_dir / cell.id / rundir.RUN_FILE, "run record")
    metric = TASKS.get(cell.task.name).cls.primary_metric
    out = {
        "metric": metric,
        "trainable_percent": record.get("trainable_percent"),
        "train_runtime_s": record.get("train_runtime_s"),
        "peak_memory_mb": record.get("peak_memory_mb"),
        "validation": (record.get("metrics") or {}).get(metric),
    }
    eval_path = grid_dir / cell.id / EVAL_FILE
    if eval_path.is_file():
        scored = rundir.read_json(eval_path, "evaluation")
        out["after"] = scored.get(metric)
        source = baselines.get(cell.baseline_key)
        if "baseline" in scored:
            out["before"] = scored["baseline"].get(metric)
        elif source:
            base = rundir.read_json(grid_dir / source / EVAL_FILE, "evaluation").get("baseline", {})
            out["before"] = base.get(metric)
    return out


@dataclasses.dataclass
class Book:
    """What grid.json says beside the cells themselves: how the grid was started, where it runs, which cell holds
    each (model, task) pair's baseline, and what its searches found."""

    spec: GridSpec
    command: list[str]
    launcher: dict[str, Any]
    executor: dict[str, Any]
    needs: dict[str, Need]
    started: str = dataclasses.field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    baselines: dict[str, str] = dataclasses.field(default_factory=dict)  # baseline key -> cell whose eval.json has it
    searches: dict[str, Any] = dataclasses.field(default_factory=dict)  # search key -> its record

    def state(self, cells: list[Cell]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for cell in cells:
            counts[cell.status] = counts.get(cell.status, 0) + 1
        runnable = [c for c in cells if c.status not in (REFUSED, EXCLUDED)]
        spec = self.spec
        return {
            "version": 1,
            "name": spec.name,
            "spec": str(spec.path.resolve()),
            "command": self.command,
            "status": "completed" if all(c.status == DONE for c in runnable) else "incomplete",
            "started": self.started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "counts": counts,
            "baseline": spec.baseline,
            "few_shot": spec.few_shot,
            "baselines": self.baselines,
            "search": self.searches,
            "launcher": self.launcher if self.launcher else None,
            "executor": self.executor,
            "axes": {
                "models": {m.label: m.name for m in spec.models},
                "tasks": {t.label: t.name for t in spec.tasks},
                "methods": {m.label: m.name for m in spec.methods},
                "seeds": [s.name for s in spec.seeds],
            },
            "cells": [self.cell_state(c) for c in cells],
        }

    def cell_state(self, c: Cell) -> dict[str, Any]:
        return {
            "id": c.id,
            **c.labels(),
            "model_ref": c.model.name,
            "task_name": c.task.name,
            "method_name": c.method.name,
            "run_dir": c.id,
            "config": f"{CONFIGS}/{c.id}.yaml",
            "log": f"{LOGS}/{c.id}.log",
            "status": c.status,
            "running": c.stage,  # train or evaluate while it runs, else null
            "error": c.error,
            "attempts": c.attempts,
            "where": c.where,
            "predicted_memory_mb": self.needs[c.id].memory_mb if c.id in self.needs else None,
            "seconds": c.seconds,
            "baseline_key": c.baseline_key,
            "baseline_cell": self.baselines.get(c.baseline_key) if self.spec.baseline or self.spec.few_shot else None,
            "summary": c.summary,
            "searched": c.searched or None,
            "options": c.values,
        }


@dataclasses.dataclass(frozen=True)
class View:
    """What the display shows of a running grid: a snapshot the scheduler hands it, never the scheduler itself."""

    name: str
    clock: float  # time.time() when the grid started
    cells: tuple[Cell, ...]
    running: int
