"""Running a grid: planning (every cell loaded as training would load it, refusals marked, what is on disk found),
then each cell as a `launch.train` process and scored by `launch.evaluate`, with `grid.json` rewritten atomically
after every step; signals checkpoint the running cell."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers.trainer_utils import get_last_checkpoint

from ftctl.errors import FtctlError
from ftctl.models import load_config, resolve_model
from launch import configs, launcher, rundir, runs
from launch.config import resolve_values
from launch.evaluate import main as evaluate
from launch.progress import EVENTS_FILE, last_event
from launch.quiet import quiet_transformers
from launch.studies import search as searching
from launch.studies.display import Display
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
        self,
        spec: GridSpec,
        cells: list[Cell],
        grid_dir: Path,
        launch_options: dict[str, Any],
        command: list[str],
        searches: list[searching.Search] | None = None,
    ):
        self.spec, self.cells, self.dir = spec, cells, grid_dir
        # searches whose cells can still run (planning may have refused them all)
        self.searches = [s for s in searches or [] if any(c.status != REFUSED for c in s.cells)]
        self.search_records: dict[str, Any] = {  # what earlier runs of the grid searched, kept in grid.json
            s.key: s.record(s.study()) for s in self.searches if (s.root / searching.STORAGE).is_file()
        }
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
            "few_shot": self.spec.few_shot,
            "baselines": self.baselines,
            "search": {
                s.key: self.search_records.get(s.key) or {"space": s.space, "metric": s.metric, "trials": []}
                for s in self.searches
            },
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

    # ---- one cell --------------------------------------------------------------------------------------------
    def _env(self, cell: Cell) -> dict[str, str]:
        extra = {"COLUMNS": os.environ.get("COLUMNS", "160")}
        if "mlflow" in (cell.values.get("report_to") or []):  # every cell in one experiment, the axes as tags
            tags = {"ftctl.grid": self.spec.name, **{f"ftctl.grid.{k}": str(v) for k, v in cell.labels().items()}}
            extra.update(MLFLOW_EXPERIMENT_NAME=self.spec.name, MLFLOW_TAGS=json.dumps(tags))
        return configs.child_environment(extra)

    def train_command(self, cell: Cell) -> list[str]:
        argv = ["--config", str(self.dir / CONFIGS / f"{cell.id}.yaml"), "--output-dir", str(self.dir / cell.id)]
        if cell.status == INTERRUPTED:
            argv.append("--resume" if cell.resume else "--overwrite")
        return self._launch(argv)

    def _launch(self, argv: list[str]) -> list[str]:
        if self.launch_options:
            options = {"rendezvous_timeout": 300, **self.launch_options}
            return launcher.build_command(options, argv)
        return [sys.executable, "-m", "launch.train", *argv]

    def evaluate_args(self, cell: Cell) -> list[str]:
        """`ftctl evaluate` arguments for the cell: the first of a (model, task) pair also scores the baseline (and
        the few-shot one, where the grid asks for it and the task is prompted)."""
        args = [str(self.dir / cell.id)]
        if (self.spec.baseline or self.spec.few_shot) and cell.baseline_key not in self.baselines:
            args += ["--baseline"] if self.spec.baseline else []
            if self.spec.few_shot and issubclass(TASKS.get(cell.task.name).cls, Prompted):
                args += ["--few-shot", str(self.spec.few_shot)]
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
        def progress(proc: subprocess.Popen) -> None:
            if cell.stage == "train":
                event = last_event(self.dir / cell.id / EVENTS_FILE)
                if event and event.get("max_steps"):
                    cell.step = (int(event["step"]), int(event["max_steps"]))

        return self._process(cmd, self.dir / LOGS / f"{cell.id}.log", cell, str(cell.stage), progress)

    def _process(
        self, cmd: list[str], log: Path, cell: Cell, what: str, poll: Callable[[subprocess.Popen], None]
    ) -> int:
        """Run one training process (its output into `log`), calling `poll` twice a second while it runs."""
        with log.open("a", encoding="utf-8") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {shlex.join(cmd)}\n")
            out.flush()
            # its own session: a Ctrl-C in the terminal reaches the grid only, which passes exactly one on
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=os.getcwd(),
                env=self._env(cell),
                start_new_session=True,
                preexec_fn=_stop_with_parent,
            )
            try:
                while self.proc.poll() is None:
                    time.sleep(0.5)
                    poll(self.proc)
                poll(self.proc)  # what it wrote last
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
        if "--baseline" in args or "--few-shot" in args:
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
        code = self._process(self._launch(argv), log, found.cells[0], f"search trial {params}", poll)
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
                for found in self.searches:
                    if self.signals:
                        break
                    if any(c.status not in FINAL for c in found.cells):
                        self.run_search(found, display)
                for cell in todo:
                    if cell.status == FAILED and cell.error and cell.error.startswith("search:"):
                        continue
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
