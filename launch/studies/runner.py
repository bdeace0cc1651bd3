"""Running a grid: planning (every cell loaded as training would load it, refusals marked, what is on disk found,
what each cell needs of the executor), then the cells through the executor (launch/studies/executors.py: this
machine, N at a time, or a Ray cluster), each a `launch.train` process scored by `launch.evaluate`, with `grid.json`
rewritten atomically after every step; signals checkpoint every running cell."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import shlex
import signal
import subprocess
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers.trainer_utils import get_last_checkpoint

from ftctl.errors import FtctlError
from ftctl.models import load_config, resolve_model
from launch.evaluate import main as evaluate
from launch.plan import plan_run
from launch.run import configs, rundir, runs
from launch.run.config import resolve_values
from launch.run.planning.fit import gpu_need_mb
from launch.run.progress import EVENTS_FILE, last_event
from launch.run.quiet import quiet_transformers
from launch.studies import search as searching
from launch.studies.display import Display
from launch.studies.executors import (
    RETRIES,
    Machine,
    Need,
    ProcessJob,
    RayCluster,
    Slot,
    cell_command,
    evaluate_command,
    killed,
    resume_flag,
)
from launch.studies.spec import DONE, EXCLUDED, FAILED, FINAL, INTERRUPTED, REFUSED, TRAINED, Cell, GridSpec
from tasks import TASKS
from tasks.base import Prompted

GRID_FILE = "grid.json"


SPEC_COPY = "grid.yaml"


CONFIGS = "configs"


LOGS = "logs"


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


# ---- planning: check everything before writing anything ------------------------------------------------------
def plan(spec: GridSpec, cells: list[Cell], grid_dir: Path, launch_options: dict[str, Any]) -> dict[str, runs.Run]:
    """Load every cell as training would (launch.run.runs: the same checks, the launch facts of the grid's launcher
    options, each model's config read once), mark the combinations a method or task refuses, and find what is
    already on disk (finished, interrupted, changed since it ran). Writes nothing; returns the cells to train, loaded
    (what the executor's needs are predicted from)."""

    quiet_transformers()
    accelerate = cell_launcher(launch_options)
    known: dict[str, Any] = {}  # model configs, read once per model: a model that cannot be read stops the grid
    loaded: dict[str, runs.Run] = {}
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
        loaded[cell.id] = run
        if run_dir.exists() and any(run_dir.iterdir()):
            if not rundir.is_ftctl_dir(run_dir):
                raise FtctlError(
                    f"{run_dir} exists and is not an ftctl run directory; move it away to run cell {cell.id}"
                )
            cell.resume = _resumable(cell, run, run_dir)
            cell.status = INTERRUPTED
    return loaded


def needs(
    cells: list[Cell], loaded: dict[str, runs.Run], executor: Any, gpu_memory_mb: float | None, predict: bool
) -> dict[str, Need]:
    """What each cell to run asks of the executor: its processes and, where `predict`, its predicted memory per
    process (`ftctl plan`'s prediction, for the executor's device; cells differing only in their seed share it).
    A cell that does not fit `--gpu-memory`, or needs more GPUs than any node has, stops the grid here, with what
    would make it fit."""

    out: dict[str, Need] = {}
    predicted: dict[str, dict[str, Any]] = {}
    device = "cuda" if gpu_memory_mb is not None else executor.device
    options = {"limit_mb": gpu_memory_mb, "device": device, "tflops": None}
    for cell in cells:
        run = loaded.get(cell.id)
        if cell.status in FINAL or run is None:
            continue
        memory = None
        if predict or gpu_memory_mb is not None:
            key = json.dumps({k: v for k, v in cell.values.items() if k != "seed"}, sort_keys=True, default=str)
            if key not in predicted:
                try:
                    predicted[key] = plan_run(run, cell.id, options)
                except FtctlError as exc:  # its data, say: the cell fails with that error when it runs, alone
                    predicted[key] = {"run": cell.id, "advice": f"not predicted: {exc}"}
            row = predicted[key]
            if row.get("fits") == "no":
                raise FtctlError(
                    f"cell {cell.id} needs {gpu_need_mb(row['peak']) / 1024:.1f} GiB per GPU, more than "
                    f"--gpu-memory {(gpu_memory_mb or 0) / 1024:.1f} GiB: {row['advice']}; change it in the grid file"
                )
            if "peak" in row:
                memory = gpu_need_mb(row["peak"]) if device == "cuda" else float(row["peak"])
        need = Need(run.launch.num_processes if cell.status != TRAINED else 1, memory)
        executor.check(cell.id, need)
        out[cell.id] = need
    return out


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


@dataclasses.dataclass
class Active:
    """A running cell: its current process (a `ProcessJob`, or its Ray task), where it runs, its scoring arguments,
    and the exit code of a scoring done in this process."""

    cell: Cell
    job: Any
    slot: Slot | None = None
    args: list[str] = dataclasses.field(default_factory=list)
    code: int | None = None


class Runner:
    """Runs a grid's cells through an executor (this machine, N cells at a time, or a Ray cluster), each cell as
    subprocesses, and keeps grid.json and the display current."""

    def __init__(
        self,
        spec: GridSpec,
        cells: list[Cell],
        grid_dir: Path,
        launch_options: dict[str, Any],
        command: list[str],
        searches: list[searching.Search] | None = None,
        executor: Machine | RayCluster | None = None,
        needs: dict[str, Need] | None = None,
        retries: int = RETRIES,
    ):
        self.spec, self.cells, self.dir = spec, cells, grid_dir
        self.executor = executor or Machine(1, gpus=[])
        self.needs = needs or {}
        self.retries = retries
        # one cell at a time on this machine: scored in this process (no second start of torch)
        self.inline = isinstance(self.executor, Machine) and self.executor.jobs == 1
        self.active: dict[str, Active] = {}
        self.ended: list[Cell] = []
        self.claims: dict[str, str] = {}  # baseline key -> the cell whose scoring includes the baseline
        # searches whose cells can still run (planning may have refused them all)
        self.searches = [s for s in searches or [] if any(c.status != REFUSED for c in s.cells)]
        self.search_records: dict[str, Any] = {  # what earlier runs of the grid searched, kept in grid.json
            s.key: s.record(s.study()) for s in self.searches if (s.root / searching.STORAGE).is_file()
        }
        self.launch_options = launch_options
        self.command = command
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.clock = time.time()
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
            "few_shot": self.spec.few_shot,
            "baselines": self.baselines,
            "search": {
                s.key: self.search_records.get(s.key) or {"space": s.space, "metric": s.metric, "trials": []}
                for s in self.searches
            },
            "launcher": self.launch_options if self.launch_options else None,
            "executor": self.executor.describe(),
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
                    "where": c.where,
                    "predicted_memory_mb": self.needs[c.id].memory_mb if c.id in self.needs else None,
                    "seconds": c.seconds,
                    "baseline_key": c.baseline_key,
                    "baseline_cell": self.baselines.get(c.baseline_key)
                    if self.spec.baseline or self.spec.few_shot
                    else None,
                    "summary": c.summary,
                    "searched": c.searched or None,
                    "options": c.values,
                }
                for c in self.cells
            ],
        }

    def save(self) -> None:
        rundir.write_json(self.dir / GRID_FILE, self.state())

    # ---- one cell ----------------------------------------------------------------------------------------------
    def _env(self, cell: Cell, slot: Slot | None = None) -> dict[str, str]:
        extra = {"COLUMNS": os.environ.get("COLUMNS", "160")}
        if "mlflow" in (cell.values.get("report_to") or []):  # every cell in one experiment, the axes as tags
            tags = {"ftctl.grid": self.spec.name, **{f"ftctl.grid.{k}": str(v) for k, v in cell.labels().items()}}
            extra.update(MLFLOW_EXPERIMENT_NAME=self.spec.name, MLFLOW_TAGS=json.dumps(tags))
        if slot is not None and isinstance(self.executor, Machine):
            extra.update(slot.environment(self.executor.names, split=self.executor.jobs > 1))
        return configs.child_environment(extra)

    def _log(self, cell: Cell) -> Path:
        return self.dir / LOGS / f"{cell.id}.log"

    def _train_argv(self, cell: Cell) -> list[str]:
        return ["--config", str(self.dir / CONFIGS / f"{cell.id}.yaml"), "--output-dir", str(self.dir / cell.id)]

    def _first_flag(self, cell: Cell) -> list[str]:
        if cell.status == INTERRUPTED:
            return ["--resume" if cell.resume else "--overwrite"]
        return []

    def train_command(self, cell: Cell, flag: list[str] | None = None) -> list[str]:
        """The cell's training command; `flag` (--resume, --overwrite) as on its first attempt unless given."""
        flag = self._first_flag(cell) if flag is None else flag
        return cell_command(self.launch_options, [*self._train_argv(cell), *flag])

    def evaluate_args(self, cell: Cell) -> list[str]:
        """`ftctl evaluate` arguments for the cell, decided as it starts: the first of a (model, task) pair to start
        also scores the baseline (and the few-shot one, where the grid asks for it and the task is prompted). It
        claims the pair's baseline; if it fails, the next cell of the pair to start claims it."""
        args = [str(self.dir / cell.id)]
        key = cell.baseline_key
        if (self.spec.baseline or self.spec.few_shot) and key not in self.baselines and key not in self.claims:
            self.claims[key] = cell.id
            args += ["--baseline"] if self.spec.baseline else []
            if self.spec.few_shot and issubclass(TASKS.get(cell.task.name).cls, Prompted):
                args += ["--few-shot", str(self.spec.few_shot)]
        return args

    def _evaluate(self, cell: Cell, args: list[str]) -> int:
        """Score the cell with `launch.evaluate.main` in this process (one cell at a time): no second start of torch
        and transformers per cell, and evaluation reports no memory or speed figures that another process would have
        to isolate. Its output goes to the cell's log; any failure is the cell's, not the grid's."""

        log = self._log(cell)
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

    def _progress(self, cell: Cell) -> None:
        """The cell's stage and step, read from its run directory (wherever its processes run)."""
        run_dir = self.dir / cell.id
        if isinstance(self.executor, RayCluster) and cell.stage:
            cell.stage = "evaluate" if (run_dir / rundir.RUN_FILE).is_file() else "train"
        if cell.stage == "train":
            event = last_event(run_dir / EVENTS_FILE)
            if event and event.get("max_steps"):
                cell.step = (int(event["step"]), int(event["max_steps"]))

    def _process(
        self, cmd: list[str], log: Path, cell: Cell, what: str, poll: Callable[[subprocess.Popen], None]
    ) -> int:
        """Run one process to its end (its output into `log`), calling `poll` twice a second while it runs."""
        job = self.active["search"] = Active(cell, ProcessJob(cmd, log, self._env(cell), what))
        try:
            while job.job.poll() is None:
                time.sleep(0.5)
                poll(job.job.proc)
            poll(job.job.proc)  # what it wrote last
            return job.job.proc.returncode
        finally:
            del self.active["search"]

    def _write_config(self, cell: Cell) -> None:
        (self.dir / CONFIGS / f"{cell.id}.yaml").write_text(
            f"# cell {cell.id} of grid {self.spec.name}; repeat it with: ftctl train --config THIS_FILE "
            "--output-dir DIR\n" + yaml.safe_dump(cell.values, sort_keys=False),
            encoding="utf-8",
        )

    def _start(self, cell: Cell) -> bool:
        """Start the cell where the executor has room for it; False while it has none."""
        need = self.needs.get(cell.id) or Need(1)
        slot = None
        if isinstance(self.executor, Machine):
            slot = self.executor.place(need)
            if slot is None:
                return False
        cell.attempts += 1
        cell.error, cell.step = None, None
        cell.started = time.time()
        if cell.status != TRAINED:
            self._write_config(cell)
        cell.stage = "train" if cell.status != TRAINED else "evaluate"
        if isinstance(self.executor, RayCluster):
            cell.where = "ray"
            self.active[cell.id] = Active(cell, self.executor.submit(self._ray_job(cell), need))
        else:
            assert slot is not None
            cell.where = ",".join(self.executor.names[i] for i in slot.gpus) if slot.gpus else f"{slot.threads} threads"
            # the scoring arguments now, in the grid's order: which cell scores a pair's baseline (whose untrained
            # head is seeded by that cell) does not depend on which cell finishes first
            self.active[cell.id] = Active(cell, None, slot, self.evaluate_args(cell))
            if cell.stage == "train":
                self._train(self.active[cell.id], self._first_flag(cell))
            else:
                self._score(self.active[cell.id])
        self.save()
        return True

    def _ray_job(self, cell: Cell) -> dict[str, Any]:
        """What a cell's Ray task needs to run it on its node (launch/studies/executors.py, run_cell)."""
        return {
            "run_dir": str(self.dir / cell.id),
            "log": str(self._log(cell)),
            "lock": str(self.dir / LOGS / f"{cell.id}.lock"),
            "marker": str(self.dir / LOGS / f"{cell.id}.attempt"),
            "token": uuid.uuid4().hex,  # a retry of this submission finds it and resumes from what is on disk
            "env": {k: v for k, v in self._env(cell).items() if os.environ.get(k) != v},
            "launcher": self.launch_options,
            "trained": cell.status == TRAINED,
            "train": self._train_argv(cell),
            "flag": self._first_flag(cell),
            "evaluate": self.evaluate_args(cell),
        }

    def _train(self, active: Active, flag: list[str]) -> None:
        cell = active.cell
        active.job = ProcessJob(self.train_command(cell, flag), self._log(cell), self._env(cell, active.slot), "train")
        cell.stage = "train"

    def _score(self, active: Active) -> None:
        """Score a trained cell: in this process when cells run one at a time, else in a process of its own on the
        cell's devices."""
        cell = active.cell
        cell.stage, cell.step = "evaluate", None
        if self.inline:
            self.save()
            active.code = self._evaluate(cell, active.args)
            return
        cmd = evaluate_command(active.args)
        active.job = ProcessJob(cmd, self._log(cell), self._env(cell, active.slot), "evaluate")

    def _poll(self, active: Active) -> None:
        """One look at a running cell: its progress, and what follows when its process has ended."""
        cell = active.cell
        self._progress(cell)
        code = active.code if active.job is None else active.job.poll()
        if code is None:
            return
        if isinstance(self.executor, RayCluster):
            self._ray_ended(active, code)
        elif cell.stage == "train":
            self._trained(active, code)
        else:
            self._scored(active, code)

    def _trained(self, active: Active, code: int) -> None:
        cell = active.cell
        self._progress(cell)
        if code == 0 and (self.dir / cell.id / rundir.RUN_FILE).is_file():
            cell.status = TRAINED
            self.save()
            self._score(active)
            return
        tail = "\n".join(_tail(self._log(cell), 16384))
        if killed(code, tail) and not self.signals and cell.attempts <= self.retries:
            cell.attempts += 1  # killed, not by the grid: again, from its last checkpoint
            self._train(active, resume_flag(self.dir / cell.id))
            self.save()
            return
        self._end(active, "train", code)

    def _scored(self, active: Active, code: int) -> None:
        cell = active.cell
        if code or not (self.dir / cell.id / "eval.json").is_file():
            self._end(active, "evaluate", code)
            return
        self._done(active)

    def _ray_ended(self, active: Active, code: int) -> None:
        job = active.job
        result = job.result or {}
        if self.signals:
            job.wait()  # its processes checkpoint before the grid says it stopped
        if job.error:
            self._end(active, "train", code, job.error)
        elif result.get("stage") == "train" or code:
            self._end(active, str(result.get("stage", "train")), code)
        else:
            self._scored(active, code)

    def _done(self, active: Active) -> None:
        cell = active.cell
        key = cell.baseline_key
        if self.claims.get(key) == cell.id:
            self.baselines[key] = cell.id
        cell.status, cell.stage, cell.seconds = DONE, None, time.time() - (cell.started or time.time())
        cell.summary = self._summary(cell)
        self._release(active)

    def _end(self, active: Active, stage: str, code: int, error: str | None = None) -> None:
        """The cell stopped before it was scored: stopped on purpose (the next run continues it; plan() looks at
        what is on disk), or failed."""
        cell = active.cell
        cell.seconds, cell.stage = time.time() - (cell.started or time.time()), None
        if self.claims.get(cell.baseline_key) == cell.id:
            del self.claims[cell.baseline_key]
        if self.signals:
            cell.status = TRAINED if (self.dir / cell.id / rundir.RUN_FILE).is_file() else INTERRUPTED
        else:
            cell.status = FAILED
            cell.error = f"{stage}: {error or failure_line(self._log(cell), code)}"
        self._release(active)

    def _release(self, active: Active) -> None:
        self.active.pop(active.cell.id, None)
        if active.slot is not None and isinstance(self.executor, Machine):
            self.executor.release(active.slot)
        self.save()
        self.ended.append(active.cell)

    # ---- searches (launch/studies/search.py) ------------------------------------------------------------------
    def run_search(self, found: searching.Search, display: Display) -> None:
        """Run a search's trials (first those a signal interrupted last time), then give its cells the best values."""
        optuna = searching._optuna()
        study = found.study()
        try:
            for frozen in [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]:
                if self.signals:
                    return
                self._trial(found, study, optuna.trial.Trial(study, frozen._trial_id), display)
            while not self.signals and not found.finished(study):
                trial = study.ask()
                for name, values in found.space.items():
                    trial.suggest_categorical(name, values)
                self._trial(found, study, trial, display)
        finally:
            for cell in found.cells:
                cell.stage, cell.step = None, None
            self.search_records[found.key] = found.record(study)
            self.save()
        if self.signals:
            return
        best = found.best(study)
        if best is None:
            errors = [t["error"] for t in self.search_records[found.key]["trials"] if t.get("error")]
            for cell in found.cells:
                cell.status = FAILED
                cell.error = "search: no trial finished" + (f" ({errors[-1]})" if errors else "")
            self.save()
            return
        found.apply(best)
        display.message(f"search {found.key}: {best['params']} ({found.metric} {best['value']:.4f})")

    def _trial(self, found: searching.Search, study: Any, trial: Any, display: Display) -> None:
        """One trial: a training process scored on its carved-out validation split; each evaluation is reported
        to the pruner, which may stop it (SIGTERM: it checkpoints and exits like any stopped run)."""
        optuna = searching._optuna()
        params = dict(trial.params)
        run_dir = found.trial_dir(trial.number)
        config = run_dir.with_suffix(".yaml")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            f"# search trial {trial.number} of {found.key} (grid {self.spec.name})\n"
            + yaml.safe_dump(found.trial_config(params), sort_keys=False),
            encoding="utf-8",
        )
        argv = ["--config", str(config), "--output-dir", str(run_dir)]
        if run_dir.is_dir() and any(run_dir.iterdir()):
            argv.append("--resume" if get_last_checkpoint(str(run_dir)) else "--overwrite")
        for cell in found.cells:
            cell.stage, cell.step = "search", (trial.number + 1, found.size())
        self.save()
        earlier = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        seen = set(earlier.intermediate_values)  # reported before a signal stopped it
        pruned = False

        def poll(proc: subprocess.Popen) -> None:
            nonlocal pruned
            if pruned:  # stopping: what it evaluates meanwhile is not reported
                return
            for event in searching.evaluations(run_dir):
                done = searching.percent_done(event)  # a resumed run repeats some: reported once
                value = (event.get("metrics") or {}).get(found.metric)
                if done is None or done in seen or not isinstance(value, (int, float)):
                    continue
                seen.add(done)
                trial.report(float(value), done)
                if trial.should_prune():
                    pruned = True
                    if proc.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGTERM)
                    return

        log = self.dir / LOGS / f"search__{found.key}__trial-{trial.number}.log"
        code = self._process(
            cell_command(self.launch_options, argv), log, found.cells[0], f"search trial {params}", poll
        )
        value = searching.trial_value(run_dir, found.metric) if code == 0 else None
        if pruned:
            searching.tell(study, trial, state=optuna.trial.TrialState.PRUNED)
        elif value is not None:
            searching.tell(study, trial, value)
        elif self.signals:
            return  # left running: the next run of the grid resumes it
        else:
            trial.set_user_attr("error", failure_line(log, code))
            searching.tell(study, trial, state=optuna.trial.TrialState.FAIL)
        outcome = "pruned" if pruned else f"{found.metric} {value:.4f}" if value is not None else "failed"
        display.message(f"search {found.key} trial {trial.number} {params}: {outcome}")

    # ---- signals ---------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        for active in list(self.active.values()):  # each running cell checkpoints and stops
            if active.job is not None:
                active.job.signal(signum)

    def run(self, max_cells: int | None, fail_fast: bool) -> None:
        todo = [c for c in self.cells if c.status not in FINAL]
        display = Display(self)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with display:
                for found in self.searches:
                    if self.signals:
                        break
                    if any(c.status not in FINAL for c in found.cells):
                        self.run_search(found, display)
                queue = [c for c in todo if not (c.status == FAILED and (c.error or "").startswith("search:"))]
                self._run_cells(queue, display, max_cells, fail_fast)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for cell in self.cells:  # baselines scored meanwhile by another cell of the pair
                if cell.status == DONE:
                    cell.summary = self._summary(cell)
            self.save()
        if self.signals:
            stopped = [c.id for c in todo if c.status in (INTERRUPTED, TRAINED) and c.attempts]
            where = f" during cell {', '.join(stopped)}" if stopped else ""
            raise GridStopped(
                f"{signal.Signals(self.signals[0]).name} received: the grid stopped{where}; run the same "
                "command again to continue (finished cells are kept, an interrupted one resumes from its checkpoint)",
                self.signals[0],
            )

    def _run_cells(self, queue: list[Cell], display: Display, max_cells: int | None, fail_fast: bool) -> None:
        """Start cells in the grid's order wherever the executor has room (a cell that waits for room lets smaller
        ones behind it start), follow the running ones, until all have ended or the grid is stopping."""
        started, stopping = 0, False
        while True:
            stopping = stopping or bool(self.signals) or (max_cells is not None and started >= max_cells)
            for cell in [] if stopping else list(queue):
                if max_cells is not None and started >= max_cells:
                    break
                if self._start(cell):
                    queue.remove(cell)
                    started += 1
                    display.event(cell, "start")
            if not self.active and queue and not stopping:
                # not reached: executor.check refused, at planning, a cell that cannot run even alone
                raise FtctlError(f"cell {queue[0].id} does not fit this machine even alone")
            for active in list(self.active.values()):
                self._poll(active)
            for cell in self.ended:
                display.event(cell, "end")
                stopping = stopping or (fail_fast and cell.status == FAILED)
            self.ended.clear()
            if not self.active:
                if stopping or not queue:
                    return
                continue
            time.sleep(0.5)
