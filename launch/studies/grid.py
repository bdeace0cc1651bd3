"""Comparison grids: `ftctl grid GRID.yaml` and `python -m launch.studies.grid GRID.yaml` run `main`.

A grid is the product of its axes (models x tasks x methods x seeds), each cell one ordinary `launch.train` job in
its own run directory under the grid directory, then scored by `launch.evaluate` (on the test split when the data
has one, else the validation split, exactly as `ftctl evaluate` does). The zero-shot baseline of each (model, task)
pair is scored once, by the first of its cells to be evaluated (`--baseline`), and shared by the others.

Every cell is a separate process: peak memory and throughput are per cell, a crash or an out-of-memory error costs
one cell, not the grid, and GPU memory is returned between cells. The grid checks the whole file before it writes
anything (unknown keys, option values, models, data files), refuses the combinations a method or task cannot run
(they are listed with the reason, not run), and records its state in `grid.json` after every step, atomically.
Re-running the same command resumes: finished cells are kept, an interrupted cell continues from its last
checkpoint (or starts again when it has none), failed cells are tried again.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import gc
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.live import Live
from rich.table import Table
from transformers.trainer_utils import get_last_checkpoint

from ftctl.config import DATA, RUN_SPECS
from ftctl.errors import FtctlError, suggest
from ftctl.models import load_config, resolve_model
from ftctl.options import Parser, coerce
from launch import configs, launcher, rundir, runs
from launch.config import all_specs, load_yaml, resolve_values
from launch.configs import REPO
from launch.evaluate import main as evaluate
from launch.progress import EVENTS_FILE, last_event
from launch.quiet import quiet, quiet_transformers
from launch.studies import report
from methods import METHODS
from tasks import TASKS

GRID_FILE = "grid.json"
SPEC_COPY = "grid.yaml"
CONFIGS = "configs"
LOGS = "logs"
LOCK = ".grid.lock"


TOP_KEYS = (
    "name",
    "output_dir",
    "models",
    "tasks",
    "methods",
    "seeds",
    "settings",
    "overrides",
    "exclude",
    "baseline",
    "launcher",
)
AXES = ("model", "task", "method", "seed")
# options the grid sets for each cell itself
MANAGED = ("task", "method", "model", "seed", "output_dir", "overwrite", "resume", "resume_from", "config")
LAUNCHER_KEYS = ("accelerate_config", "num_processes", "rendezvous_timeout")
SAFE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# cell states, as written to grid.json
PENDING, DONE, TRAINED, FAILED, REFUSED, EXCLUDED, INTERRUPTED = (
    "pending",
    "done",
    "trained",
    "failed",
    "refused",
    "excluded",
    "interrupted",
)
FINAL = (DONE, REFUSED, EXCLUDED)


class CellsFailed(FtctlError):
    """Some cells failed; the others ran. Exit code 1: the grid file was fine, the runs were not."""

    exit_code = 1
    label = "failed"


class GridStopped(FtctlError):
    """A signal stopped the grid after the running cell wrote its checkpoint."""

    label = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ---- the grid file ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AxisValue:
    """One value of an axis: its label (in cell names and reports), what it names, and the options it brings."""

    label: str
    name: Any  # task or method name, model reference (None: the embedded model), or seed
    options: dict[str, Any]


@dataclasses.dataclass
class Layer:
    """Options from one place of the grid file, applied to the cells `match` selects."""

    where: str
    options: dict[str, Any]
    match: dict[str, list[str]]
    used: set[str] = dataclasses.field(default_factory=set)  # options that applied to at least one cell


@dataclasses.dataclass
class GridSpec:
    path: Path
    name: str
    output_dir: str | None
    models: list[AxisValue]
    tasks: list[AxisValue]
    methods: list[AxisValue]
    seeds: list[AxisValue]
    layers: list[Layer]  # settings, then each axis value's options, then overrides, in the order they apply
    exclude: list[dict[str, list[str]]]
    baseline: bool
    launcher: dict[str, Any]


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FtctlError(f"{where} must be a mapping of option: value, got {type(value).__name__} {value!r}")
    return value


def _options(raw: Any, where: str, specs: dict[str, Any]) -> dict[str, Any]:
    """Option values from the grid file, checked and converted like a `--config` file's keys."""

    out: dict[str, Any] = {}
    for key, value in _mapping(raw, where).items():
        name = str(key).replace("-", "_")
        if name in MANAGED:
            hint = {"seed": "list seeds under `seeds:`", "output_dir": "the grid gives each cell its own directory"}
            raise FtctlError(
                f"{where}: '{key}' is set by the grid for each cell "
                f"({hint.get(name, 'name it as an axis: models, tasks, methods')}); remove it"
            )
        if name not in specs:
            raise FtctlError(f"{where}: unknown option '{key}'{suggest(name, specs)}; keys are `ftctl train` options")
        value = coerce(specs[name], value, f"{where}: '{key}'")
        if name.endswith("_file") and value is not None:
            path = Path(value).expanduser()
            if not path.is_file():
                raise FtctlError(f"{where}: {key} {value} not found (relative paths are from the current directory)")
            value = str(path.resolve())
        out[name] = value
    return out


def _model_label(ref: str | None) -> str:
    if not ref:
        return "minilm"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(ref).rstrip("/")).name) or "model"


def _axis(data: dict[str, Any], key: str, specs: dict[str, Any], path: str) -> list[AxisValue]:
    """An axis as a list of names or a mapping label -> options (with `task:`/`method:`/`model:` to name what the
    label stands for when it differs from it, e.g. `lora_r4: {method: lora, lora_r: 4}`)."""

    kind = key[:-1]  # models -> model
    raw = data.get(key)
    if raw is None:
        if key == "models":
            return [AxisValue("minilm", None, {})]
        raise FtctlError(f"{path}: no `{key}:` given; list at least one (see `ftctl list`)")
    entries: list[tuple[str | None, Any]]
    if isinstance(raw, list):
        entries = [(None, item) for item in raw]
    elif isinstance(raw, dict):
        entries = list(raw.items())
    else:
        raise FtctlError(f"{path}: `{key}:` must be a list or a mapping, got {type(raw).__name__}")
    if not entries:
        raise FtctlError(f"{path}: `{key}:` is empty")
    values: list[AxisValue] = []
    for label, item in entries:
        where = f"{path}: {key}" + (f".{label}" if label is not None else "")
        options: dict[str, Any] = {}
        if label is None:  # a list item: a name (or a model reference)
            if key != "models" and not isinstance(item, str):
                raise FtctlError(f"{where}: list items must be {kind} names, got {item!r}")
            if key == "models" and item is not None and not isinstance(item, str):
                raise FtctlError(f"{where}: list items must be model ids or directories, got {item!r}")
            name = item
            label = _model_label(item) if key == "models" else item
        else:
            label = str(label)
            if key == "models" and (item is None or isinstance(item, str)):
                name, item = item, {}
            else:
                item = dict(_mapping(item, where))
                name = item.pop(kind, label if key != "models" else None)
            options = _options(item, where, specs)
        if not SAFE_LABEL.match(label):
            raise FtctlError(f"{where}: label '{label}' names a directory: use letters, digits, '.', '_' or '-'")
        try:
            if key == "tasks":
                TASKS.get(name)  # unknown names are errors with the close matches
            elif key == "methods":
                METHODS.get(name)
            elif name:

                name = resolve_model(str(name))  # local directories become absolute, hub ids stay
        except FtctlError as exc:
            raise FtctlError(f"{where}: {exc}") from None
        if any(v.label == label for v in values):
            raise FtctlError(f"{where}: label '{label}' appears twice; give each {kind} its own label in a mapping")
        values.append(AxisValue(label, name, options))
    return values


def _match(raw: Any, where: str, spec_axes: dict[str, list[AxisValue]]) -> dict[str, list[str]]:
    raw = _mapping(raw, where)
    if not raw:
        raise FtctlError(f"{where} is empty; name at least one of {', '.join(AXES)}")
    out: dict[str, list[str]] = {}
    for key, value in raw.items():
        if key not in AXES:
            raise FtctlError(f"{where}: unknown axis '{key}'{suggest(str(key), AXES)}; axes: {', '.join(AXES)}")
        wanted = [str(v) for v in (value if isinstance(value, list) else [value])]
        labels = [v.label for v in spec_axes[key]]
        for label in wanted:
            if label not in labels:
                raise FtctlError(
                    f"{where}: {key} '{label}' is not in the grid{suggest(label, labels)}; {key}s: {', '.join(labels)}"
                )
        out[key] = wanted
    return out


def load_spec(path: str) -> GridSpec:
    """Read and check a grid file. Raises FtctlError for anything wrong in it; reads no model or data."""

    data = load_yaml(path)
    where = Path(path).name
    for key in data:
        if key not in TOP_KEYS:
            raise FtctlError(f"{where}: unknown key '{key}'{suggest(str(key), TOP_KEYS)}; keys: {', '.join(TOP_KEYS)}")
    specs = all_specs()
    seeds_raw = data.get("seeds", [42])
    seeds_raw = seeds_raw if isinstance(seeds_raw, list) else [seeds_raw]
    if not seeds_raw or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds_raw):
        raise FtctlError(f"{where}: `seeds:` must be a list of integers, got {data.get('seeds')!r}")
    if len(set(seeds_raw)) != len(seeds_raw):
        raise FtctlError(f"{where}: `seeds:` lists a seed twice")
    axes = {
        "model": _axis(data, "models", specs, where),
        "task": _axis(data, "tasks", specs, where),
        "method": _axis(data, "methods", specs, where),
        "seed": [AxisValue(str(s), s, {}) for s in seeds_raw],
    }
    layers = [Layer(f"{where}: settings", _options(data.get("settings"), f"{where}: settings", specs), {})]
    for axis in ("model", "task", "method"):
        for value in axes[axis]:
            if value.options:
                layers.append(Layer(f"{where}: {axis}s.{value.label}", value.options, {axis: [value.label]}))
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise FtctlError(f"{where}: `overrides:` must be a list of {{match: ..., set: ...}}")
    for i, item in enumerate(overrides):
        at = f"{where}: overrides[{i}]"
        item = _mapping(item, at)
        unknown = sorted(set(item) - {"match", "set"})
        if unknown or "set" not in item:
            raise FtctlError(f"{at} must have `match:` (axis: label(s)) and `set:` (option: value), got {sorted(item)}")
        match = _match(item.get("match"), f"{at}.match", axes)
        layers.append(Layer(at, _options(item["set"], f"{at}.set", specs), match))
    exclude_raw = data.get("exclude") or []
    if not isinstance(exclude_raw, list):
        raise FtctlError(f"{where}: `exclude:` must be a list of matches (axis: label(s))")
    exclude = [_match(item, f"{where}: exclude[{i}]", axes) for i, item in enumerate(exclude_raw)]
    baseline = data.get("baseline", True)
    if not isinstance(baseline, bool):
        raise FtctlError(f"{where}: `baseline:` must be true or false, got {baseline!r}")
    launcher = dict(_mapping(data.get("launcher"), f"{where}: launcher"))
    for key in launcher:
        if key not in LAUNCHER_KEYS:
            raise FtctlError(
                f"{where}: launcher: unknown key '{key}'{suggest(str(key), LAUNCHER_KEYS)}; keys: "
                f"{', '.join(LAUNCHER_KEYS)}"
            )
    output_dir = data.get("output_dir")
    if output_dir is not None and not isinstance(output_dir, str):
        raise FtctlError(f"{where}: `output_dir:` must be a path, got {output_dir!r}")
    return GridSpec(
        path=Path(path),
        name=str(data.get("name") or Path(path).stem),
        output_dir=output_dir,
        models=axes["model"],
        tasks=axes["task"],
        methods=axes["method"],
        seeds=axes["seed"],
        layers=layers,
        exclude=exclude,
        baseline=baseline,
        launcher=launcher,
    )


# ---- cells -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cell:
    id: str
    model: AxisValue
    task: AxisValue
    method: AxisValue
    seed: int
    values: dict[str, Any]  # the cell's options: its config file
    baseline_key: str
    status: str = PENDING
    error: str | None = None
    stage: str | None = None  # train or evaluate, while running
    attempts: int = 0
    started: float | None = None  # time.time() of the current attempt
    seconds: float | None = None
    resume: bool = False  # continue from the checkpoint in its directory (else start it again)
    step: tuple[int, int] | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    def labels(self) -> dict[str, Any]:
        return {"model": self.model.label, "task": self.task.label, "method": self.method.label, "seed": self.seed}


def _selected(match: dict[str, list[str]], labels: dict[str, Any]) -> bool:
    return all(str(labels[axis]) in wanted for axis, wanted in match.items())


def _data_key(values: dict[str, Any], task_option_names: set[str]) -> str:
    """What decides a cell's evaluation data: cells sharing it share one baseline. Without validation or test
    files the validation data is a seeded split of the training data, so the seed is part of it."""


    names = {s.name for s in RUN_SPECS if s.group == DATA} | task_option_names
    if not (values.get("validation_file") or values.get("test_file")):
        names.add("seed")
    return json.dumps({k: values.get(k) for k in sorted(names)}, sort_keys=True, default=str)


def expand(spec: GridSpec) -> list[Cell]:
    """The grid's cells in order (model, task, method, seed), with the options each one gets.

    An option applies to the cells it can apply to (a run option to all, a task or method option to the cells of
    that task or method); one that applies to none of the cells it selects is an error, with where it belongs.
    """


    run_names = {s.name for s in RUN_SPECS}
    cells = []
    for model in spec.models:
        for task in spec.tasks:
            task_spec = TASKS.get(task.name)
            task_names = {s.name for s in task_spec.option_specs()}
            for method in spec.methods:
                method_names = {s.name for s in METHODS.get(method.name).option_specs()}
                for seed in spec.seeds:
                    labels = {"model": model.label, "task": task.label, "method": method.label, "seed": seed.label}
                    values: dict[str, Any] = {
                        "task": task.name,
                        "method": method.name,
                        "model": model.name,
                        "seed": seed.name,
                    }
                    for layer in spec.layers:
                        if not _selected(layer.match, labels):
                            continue
                        for key, value in layer.options.items():
                            if key in run_names or key in task_names or key in method_names:
                                values[key] = value
                                layer.used.add(key)
                    cell_id = f"{model.label}__{task.label}__{method.label}__seed{seed.name}"
                    data = _data_key(values, task_names)
                    key = f"{model.label}__{task.label}__{hashlib.sha1(data.encode()).hexdigest()[:8]}"
                    cell = Cell(cell_id, model, task, method, seed.name, values, key)
                    if any(_selected(m, labels) for m in spec.exclude):
                        cell.status = EXCLUDED
                    cells.append(cell)
    for layer in spec.layers:
        unused = [k for k in layer.options if k not in layer.used]
        if unused:
            name = unused[0]
            owners = [f"method {n}" for n, m in METHODS.items() if name in {o.name for o in m.option_specs()}]
            owners += [f"task {n}" for n, t in TASKS.items() if name in {o.name for o in t.option_specs()}]
            raise FtctlError(
                f"{layer.where}: '{name}' applies to none of the cells it selects; it is an option of "
                f"{', '.join(owners[:6])}{' ...' if len(owners) > 6 else ''}"
            )
    return cells


# ---- planning: check everything before writing anything ------------------------------------------------------
def plan(spec: GridSpec, cells: list[Cell], grid_dir: Path, launch_options: dict[str, Any]) -> None:
    """Load every cell as training would (launch.runs: the same checks, the launch facts of the grid's launcher
    options, each model's config read once), mark the combinations a method or task refuses, and find what is
    already on disk (finished, interrupted, changed since it ran). Writes nothing."""

    quiet_transformers()
    accelerate = cell_launcher(launch_options)
    known: dict[str, Any] = {}  # model configs, read once per model: a model that cannot be read stops the grid
    for model in spec.models:
        ref = resolve_model(model.name)
        known[ref] = load_config(ref, bool(model.options.get("trust_remote_code")))
    for cell in cells:
        try:
            resolved = resolve_values(dict(cell.values))
        except FtctlError as exc:
            raise FtctlError(f"cell {cell.id}: {exc}") from None
        run_dir = grid_dir / cell.id
        _check_unchanged(cell, run_dir)
        if cell.status == EXCLUDED:
            continue
        if (run_dir / rundir.RUN_FILE).is_file():  # it ran (perhaps on another machine): keep it
            cell.status = DONE if (run_dir / "eval.json").is_file() else TRAINED
            continue
        try:
            run = runs.load(resolved, runs.launch_facts(resolved.cfg, {}, accelerate), known=known)
        except FtctlError as exc:
            cell.status, cell.error = REFUSED, str(exc)
            continue
        if run_dir.exists() and any(run_dir.iterdir()):
            if not rundir.is_ftctl_dir(run_dir):
                raise FtctlError(
                    f"{run_dir} exists and is not an ftctl run directory; move it away to run cell {cell.id}"
                )
            cell.resume = _resumable(cell, run, run_dir)
            cell.status = INTERRUPTED


def cell_launcher(launch_options: dict[str, Any]) -> dict[str, Any]:
    """The accelerate config each cell is launched with (its processes as the grid sets them), as a mapping."""

    config: dict[str, Any] = {}
    if launch_options.get("accelerate_config"):
        config = configs.read_accelerate(configs.resolve_accelerate_config(str(launch_options["accelerate_config"])))
    if launch_options.get("num_processes"):
        config["num_processes"] = launch_options["num_processes"]
    return config


def _resumable(cell: Cell, run: Any, run_dir: Path) -> bool:
    """An unfinished cell continues from its newest checkpoint, unless it has none, its method cannot resume, or the
    grid file now gives it other options (its checkpoint belongs to another run: it starts again)."""


    if get_last_checkpoint(str(run_dir)) is None:
        return False
    spec = run_dir / rundir.SPEC_FILE
    if not spec.is_file() or _changed(rundir.read_json(spec, "run spec"), cell.values):
        return False
    resuming = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, resume=True))
    try:
        resuming.method.check(resuming.context())
    except FtctlError:
        return False
    return True


def _changed(recorded: dict[str, Any], values: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first option whose value in a run's record (`run.json` or `spec.json`) differs from the cell's now."""

    ran = recorded.get("config", {})
    given = set(recorded.get("explicit", [])) - {"output_dir", "overwrite", "resume", "resume_from"}
    for key in sorted(given | set(values)):
        then = ran.get(key) if key in given else "(default)"
        now = values[key] if key in values else "(default)"
        if json.dumps(then, default=str) != json.dumps(now, default=str):
            return key, then, now
    return None


def _check_unchanged(cell: Cell, run_dir: Path) -> None:
    """A finished cell must have run with the options the grid file gives it now; else say what changed."""

    record_path = run_dir / rundir.RUN_FILE
    if not record_path.is_file():
        return
    changed = _changed(rundir.read_json(record_path, "run record"), cell.values)
    if changed:
        key, then, now = changed
        raise FtctlError(
            f"cell {cell.id} finished with {key}={then!r} but the grid file now gives {key}={now!r}; remove "
            f"{run_dir} to run it again with the new settings, or use another --output-dir"
        )


# ---- running -----------------------------------------------------------------------------------------------------


def _tail(path: Path, size: int = 8192) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def failure_line(log: Path, code: int) -> str:
    """The one line that says why a cell's process failed: its `error:` line, else the last exception line."""
    lines = [line.strip() for line in _tail(log, 65536) if line.strip()]
    for prefix in ("error: ", "stopped: ", "failed: "):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[-1][len(prefix) :]
    exceptions = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line)]
    if exceptions:
        return exceptions[-1]
    return f"exit code {code}; see {log}"


class Runner:
    """Runs a grid's cells one after the other, each as a subprocess, and keeps grid.json and the display current."""

    def __init__(
        self, spec: GridSpec, cells: list[Cell], grid_dir: Path, launch_options: dict[str, Any], command: list[str]
    ):
        self.spec, self.cells, self.dir = spec, cells, grid_dir
        self.launch_options = launch_options
        self.command = command
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.clock = time.time()
        self.proc: subprocess.Popen | None = None
        self.signals: list[int] = []
        self.baselines: dict[str, str] = {}  # baseline key -> cell whose eval.json holds the baseline
        finished = [c for c in cells if c.status == DONE]
        for cell in finished:
            if self._has_baseline(cell):
                self.baselines.setdefault(cell.baseline_key, cell.id)
        for cell in finished:
            cell.summary = self._summary(cell)

    # ---- state file ------------------------------------------------------------------------------------------
    def _has_baseline(self, cell: Cell) -> bool:

        path = self.dir / cell.id / "eval.json"
        return path.is_file() and "baseline" in rundir.read_json(path, "evaluation")

    def _summary(self, cell: Cell) -> dict[str, Any]:
        """The cell's headline numbers for grid.json and the live table (the report has them all)."""

        record = rundir.read_json(self.dir / cell.id / rundir.RUN_FILE, "run record")
        metric = TASKS.get(cell.task.name).cls.primary_metric
        out = {
            "metric": metric,
            "trainable_percent": record.get("trainable_percent"),
            "train_runtime_s": record.get("train_runtime_s"),
            "peak_memory_mb": record.get("peak_memory_mb"),
            "validation": (record.get("metrics") or {}).get(metric),
        }
        eval_path = self.dir / cell.id / "eval.json"
        if eval_path.is_file():
            scored = rundir.read_json(eval_path, "evaluation")
            out["after"] = scored.get(metric)
            source = self.baselines.get(cell.baseline_key)
            if "baseline" in scored:
                out["before"] = scored["baseline"].get(metric)
            elif source:
                base = rundir.read_json(self.dir / source / "eval.json", "evaluation").get("baseline", {})
                out["before"] = base.get(metric)
        return out

    def state(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for cell in self.cells:
            counts[cell.status] = counts.get(cell.status, 0) + 1
        runnable = [c for c in self.cells if c.status not in (REFUSED, EXCLUDED)]
        status = "completed" if all(c.status == DONE for c in runnable) else "incomplete"
        return {
            "version": 1,
            "name": self.spec.name,
            "spec": str(self.spec.path.resolve()),
            "command": self.command,
            "status": status,
            "started": self.started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "counts": counts,
            "baseline": self.spec.baseline,
            "baselines": self.baselines,
            "launcher": self.launch_options if self.launch_options else None,
            "axes": {
                "models": {m.label: m.name for m in self.spec.models},
                "tasks": {t.label: t.name for t in self.spec.tasks},
                "methods": {m.label: m.name for m in self.spec.methods},
                "seeds": [s.name for s in self.spec.seeds],
            },
            "cells": [
                {
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
                    "seconds": c.seconds,
                    "baseline_key": c.baseline_key,
                    "baseline_cell": self.baselines.get(c.baseline_key) if self.spec.baseline else None,
                    "summary": c.summary,
                    "options": c.values,
                }
                for c in self.cells
            ],
        }

    def save(self) -> None:

        rundir.write_json(self.dir / GRID_FILE, self.state())

    # ---- one cell --------------------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": path, "COLUMNS": os.environ.get("COLUMNS", "160")}

    def train_command(self, cell: Cell) -> list[str]:
        argv = ["--config", str(self.dir / CONFIGS / f"{cell.id}.yaml"), "--output-dir", str(self.dir / cell.id)]
        if cell.status == INTERRUPTED:
            argv.append("--resume" if cell.resume else "--overwrite")
        if self.launch_options:

            options = {"rendezvous_timeout": 300, **self.launch_options}
            return launcher.build_command(options, argv)
        return [sys.executable, "-m", "launch.train", *argv]

    def evaluate_args(self, cell: Cell) -> list[str]:
        """`ftctl evaluate` arguments for the cell: the first of a (model, task) pair also scores the baseline."""
        args = [str(self.dir / cell.id)]
        if self.spec.baseline and cell.baseline_key not in self.baselines:
            args.append("--baseline")
        return args

    def _evaluate(self, cell: Cell, args: list[str]) -> int:
        """Score the cell with `launch.evaluate.main` in this process: no second start of torch and transformers
        per cell, and evaluation reports no memory or speed figures that another process would have to isolate.
        Its output goes to the cell's log; any failure is the cell's, not the grid's."""


        log = self.dir / LOGS / f"{cell.id}.log"
        with log.open("a", encoding="utf-8") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} evaluate: ftctl evaluate {shlex.join(args)}\n")
            try:
                evaluate(args)
                code = 0
            except FtctlError as exc:
                print(f"{exc.label}: {exc}")
                code = exc.exit_code
            except Exception:  # noqa: BLE001  a crash while scoring one cell must not end the grid
                traceback.print_exc()
                code = 1
            finally:
                gc.collect()

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the next cell's process gets the memory back
        return code

    def _run(self, cell: Cell, cmd: list[str]) -> int:

        log = self.dir / LOGS / f"{cell.id}.log"
        with log.open("a", encoding="utf-8") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {cell.stage}: {shlex.join(cmd)}\n")
            out.flush()
            # its own session: a Ctrl-C in the terminal reaches the grid only, which passes exactly one on
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=os.getcwd(),
                env=self._env(),
                start_new_session=True,
                preexec_fn=_stop_with_parent,
            )
            try:
                while self.proc.poll() is None:
                    time.sleep(0.5)
                    if cell.stage == "train":
                        event = last_event(self.dir / cell.id / EVENTS_FILE)
                        if event and event.get("max_steps"):
                            cell.step = (int(event["step"]), int(event["max_steps"]))
                return self.proc.returncode
            finally:
                self.proc = None

    def run_cell(self, cell: Cell) -> None:


        cell.attempts += 1
        cell.error, cell.step = None, None
        cell.started = clock = time.time()
        if cell.status != TRAINED:
            (self.dir / CONFIGS / f"{cell.id}.yaml").write_text(
                f"# cell {cell.id} of grid {self.spec.name}; repeat it with: ftctl train --config THIS_FILE "
                "--output-dir DIR\n" + yaml.safe_dump(cell.values, sort_keys=False),
                encoding="utf-8",
            )
            cell.stage = "train"
            self.save()
            code = self._run(cell, self.train_command(cell))
            if code or not (self.dir / cell.id / rundir.RUN_FILE).is_file():
                self._failed(cell, "train", code, clock)
                return
            cell.status = TRAINED
        cell.stage = "evaluate"
        self.save()
        args = self.evaluate_args(cell)
        code = self._evaluate(cell, args)
        if code or not (self.dir / cell.id / "eval.json").is_file():
            self._failed(cell, "evaluate", code, clock)
            return
        if "--baseline" in args:
            self.baselines[cell.baseline_key] = cell.id
        cell.status, cell.stage, cell.seconds = DONE, None, time.time() - clock
        cell.summary = self._summary(cell)
        self.save()

    def _failed(self, cell: Cell, stage: str, code: int, clock: float) -> None:

        cell.seconds, cell.stage = time.time() - clock, None
        if self.signals:  # stopped on purpose: the next run continues it (plan() looks at what is on disk)
            cell.status = TRAINED if (self.dir / cell.id / rundir.RUN_FILE).is_file() else INTERRUPTED
        else:
            cell.status = FAILED
            cell.error = f"{stage}: {failure_line(self.dir / LOGS / f'{cell.id}.log', code)}"
        self.save()

    # ---- signals ---------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signum)  # the cell checkpoints and stops; a second signal stops it at once
            except ProcessLookupError:
                pass

    def run(self, max_cells: int | None, fail_fast: bool) -> None:
        todo = [c for c in self.cells if c.status not in FINAL]
        display = Display(self)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        ran = 0
        try:
            with display:
                for cell in todo:
                    if self.signals or (max_cells is not None and ran >= max_cells):
                        break
                    display.event(cell, "start")
                    self.run_cell(cell)
                    ran += 1
                    display.event(cell, "end")
                    if cell.status == FAILED and fail_fast:
                        break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.save()
        if self.signals:
            running = next((c for c in todo if c.status in (INTERRUPTED, TRAINED) and c.attempts), None)
            where = f" during cell {running.id}" if running else ""
            raise GridStopped(
                f"{signal.Signals(self.signals[0]).name} received: the grid stopped{where}; run the same "
                "command again to continue (finished cells are kept, an interrupted one resumes from its checkpoint)",
                self.signals[0],
            )


def _stop_with_parent() -> None:
    """In the cell's process, before it starts: SIGTERM when the grid process dies, so that a grid killed outright
    leaves no training running on its own (which would race the next run of the grid for the same directory).
    Linux only; elsewhere the cell finishes by itself."""
    try:

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Display:
    """A live rich table in a terminal; one line per cell start and end otherwise (logs, CI)."""

    STYLE = {
        DONE: "green",
        FAILED: "red",
        REFUSED: "yellow",
        EXCLUDED: "dim",
        INTERRUPTED: "magenta",
        TRAINED: "cyan",
        PENDING: "",
    }

    def __init__(self, runner: Runner):

        self.runner = runner
        # the terminal as it is now: a cell's evaluation redirects sys.stdout to its log for a while
        self.console = Console(file=sys.stdout, highlight=False)
        self.live: Any = None

    def __enter__(self) -> Display:
        if self.console.is_terminal:

            self.live = Live(get_renderable=self.table, console=self.console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def _status(self, cell: Cell) -> str:
        if cell.stage == "train":
            return f"training {cell.step[0]}/{cell.step[1]}" if cell.step else "training (starting)"
        if cell.stage == "evaluate":
            return "evaluating"
        return cell.status

    @staticmethod
    def _metric(cell: Cell) -> str:
        s = cell.summary
        if "after" not in s or s.get("after") is None:
            return ""
        before = f"{s['before']:.4f} -> " if isinstance(s.get("before"), (int, float)) else ""
        return f"{s['metric']} {before}{s['after']:.4f}"

    def table(self) -> Any:

        runner = self.runner
        done = sum(c.status == DONE for c in runner.cells)
        total = sum(c.status not in (REFUSED, EXCLUDED) for c in runner.cells)
        elapsed = time.time() - runner.clock
        table = Table(
            title=f"grid {runner.spec.name}: {done}/{total} cells done, {elapsed:.0f} s", title_justify="left"
        )
        for column in ("model", "task", "method", "seed", "status", "time", "result"):
            table.add_column(column, overflow="fold")
        for cell in runner.cells:
            style = "bold" if cell.stage else self.STYLE.get(cell.status, "")
            seconds = time.time() - cell.started if cell.stage and cell.started else cell.seconds
            result = self._metric(cell) or (cell.error or "")[:100]
            table.add_row(
                cell.model.label,
                cell.task.label,
                cell.method.label,
                str(cell.seed),
                self._status(cell),
                f"{seconds:.0f} s" if seconds else "",
                result,
                style=style,
            )
        return table

    def event(self, cell: Cell, what: str) -> None:
        if self.live is not None:
            return
        runner = self.runner
        position = runner.cells.index(cell) + 1
        if what == "start":
            self.console.print(f"[{position}/{len(runner.cells)}] {cell.id}: running", markup=False)
        else:
            outcome = self._metric(cell) if cell.status == DONE else (cell.error or cell.status)
            took = f" in {cell.seconds:.0f} s" if cell.seconds else ""
            self.console.print(
                f"[{position}/{len(runner.cells)}] {cell.id}: {cell.status}{took}: {outcome}", markup=False
            )


# ---- entry point ---------------------------------------------------------------------------------------------------
def build_parser() -> Any:

    parser = Parser(
        prog="ftctl grid",
        description="Run a comparison grid (models x tasks x methods x seeds) from a YAML file, one run directory "
        "per cell; re-running the same command resumes it. See README, 'Comparison grids'.",
    )
    parser.add_argument("grid", metavar="GRID.yaml", help="the grid file")
    parser.add_argument(
        "--output-dir", metavar="DIR", help="grid directory (default: the file's output_dir, else grids/<file name>)"
    )
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    parser.add_argument("--max-cells", type=int, metavar="N", help="run at most N cells this time, then stop")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the file and print the cells and their commands; run and write nothing",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="write the report to GRID_DIR/report at the end (replacing an earlier one)",
    )
    group = parser.add_argument_group("launcher (each cell through accelerate launch; also `launcher:` in the file)")
    group.add_argument(
        "--accelerate-config",
        metavar="NAME|PATH",
        help="accelerate config: a file in accelerate_configs/ (without .yaml) or a path",
    )
    group.add_argument("--num-processes", type=int, metavar="N", help="processes per cell")
    return parser


def _grid_dir(spec: GridSpec, given: str | None) -> Path:
    path = Path(given or spec.output_dir or Path("grids") / spec.path.stem)
    if path.exists() and not path.is_dir():
        raise FtctlError(f"grid directory {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / GRID_FILE).is_file():
        raise FtctlError(
            f"{path} exists, is not empty and holds no {GRID_FILE}: not a grid directory; choose another --output-dir"
        )
    return path


def _launch_options(spec: GridSpec, opts: dict[str, Any]) -> dict[str, Any]:
    options = dict(spec.launcher)
    for key in ("accelerate_config", "num_processes"):
        if opts.get(key) is not None:
            options[key] = opts[key]
    if options.get("num_processes") is not None and (
        not isinstance(options["num_processes"], int) or options["num_processes"] < 1
    ):
        raise FtctlError(f"launcher num_processes must be a positive integer, got {options['num_processes']!r}")

    if options.get("accelerate_config"):
        launcher.resolve_accelerate_config(str(options["accelerate_config"]))
    wanted = launcher.wants_launcher({**options, "dry_run": False})
    return options if wanted else {}


class _Lock:
    """One `ftctl grid` per grid directory at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.file: Any = None

    def __enter__(self) -> _Lock:

        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise FtctlError(f"another ftctl grid is running in {self.path.parent}; wait for it to finish") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a grid; returns the grid state written to grid.json."""


    quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_strict(argv)
    if opts["max_cells"] is not None and opts["max_cells"] < 1:
        raise FtctlError(f"--max-cells must be at least 1, got {opts['max_cells']}")
    spec = load_spec(opts["grid"])
    launch_options = _launch_options(spec, opts)
    grid_dir = _grid_dir(spec, opts["output_dir"])
    cells = expand(spec)
    plan(spec, cells, grid_dir, launch_options)
    command = ["ftctl", "grid", *argv]
    runner = Runner(spec, cells, grid_dir, launch_options, command)


    console = Console(highlight=False)
    if opts["dry_run"]:
        state = runner.state()
        for cell in cells:
            print(f"{cell.id}: {cell.status}" + (f" ({cell.error})" if cell.status == REFUSED else ""))
            if cell.status not in FINAL:
                if cell.status != TRAINED:
                    print(f"    {shlex.join(runner.train_command(cell))}")
                evaluate = runner.evaluate_args(cell)
                print(f"    ftctl evaluate {shlex.join(evaluate)}  (in the grid's process)")
                if "--baseline" in evaluate:  # as the run would: the first cell of a (model, task) scores it
                    runner.baselines[cell.baseline_key] = cell.id
        return state

    grid_dir.mkdir(parents=True, exist_ok=True)
    with _Lock(grid_dir / LOCK):
        (grid_dir / CONFIGS).mkdir(exist_ok=True)
        (grid_dir / LOGS).mkdir(exist_ok=True)
        if spec.path.resolve() != (grid_dir / SPEC_COPY).resolve():
            shutil.copyfile(spec.path, grid_dir / SPEC_COPY)
        runner.save()
        waiting = [c for c in cells if c.status not in FINAL]
        refused = [c for c in cells if c.status == REFUSED]
        console.print(
            f"grid {spec.name}: {len(cells)} cells, {len(cells) - len(waiting) - len(refused)} already done, "
            f"{len(refused)} refused, {len(waiting)} to run -> {grid_dir}",
            markup=False,
        )
        for cell in refused:
            console.print(f"  refused {cell.id}: {cell.error}", markup=False)
        try:
            runner.run(opts["max_cells"], opts["fail_fast"])
        finally:
            if opts["report"]:
                _report(grid_dir, console)
    state = runner.state()
    failed = [c for c in cells if c.status == FAILED]
    left = [c for c in cells if c.status not in FINAL and c.status != FAILED]
    console.print(f"report it: ftctl report {grid_dir}", markup=False)
    if failed:
        names = "; ".join(f"{c.id} ({c.error})" for c in failed[:3]) + (" ..." if len(failed) > 3 else "")
        raise CellsFailed(
            f"{len(failed)} of {len(cells)} cells failed: {names}; logs in {grid_dir / LOGS}; fix and "
            "run the same command again to retry only those"
        )
    if left:
        console.print(f"stopped with {len(left)} cells left; run the same command again to continue", markup=False)
    return state


def _report(grid_dir: Path, console: Any) -> None:

    if not (grid_dir / GRID_FILE).is_file():
        return
    out = grid_dir / "report"
    try:
        report.build([grid_dir], out, overwrite=True)
        console.print(f"wrote {out / 'report.md'}", markup=False)
    except FtctlError as exc:  # no finished cell yet: nothing to report, and no reason to fail the grid over it
        console.print(f"no report: {exc}", markup=False)


if __name__ == "__main__":
    from ftctl.errors import run_main

    sys.exit(run_main(main))
