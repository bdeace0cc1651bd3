"""Running a planned grid (launch/studies/planning.py): its searches first (launch/studies/trials.py), then its
cells, started in the grid's order wherever the executor has room (launch/studies/executors/: this machine, N at a
time, or a Ray cluster) and followed to their end, with `grid.json` rewritten atomically after every step
(launch/studies/state.py). A signal tells every running cell to checkpoint and stop; the next run continues.

The scheduler never asks which executor it has: every executor takes a `CellJob` and reports an `Outcome`."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shlex
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

from ftctl.errors import FtctlError
from launch.evaluate import main as evaluate
from launch.run import configs, rundir
from launch.run.progress import EVENTS_FILE, last_event
from launch.studies import search as searching
from launch.studies.display import Display
from launch.studies.executors import RETRIES, CellJob, CellRun, Executor, Machine, Need, Outcome, cell_command
from launch.studies.spec import DONE, FAILED, FINAL, INTERRUPTED, REFUSED, TRAINED, Cell, GridSpec
from launch.studies.state import CONFIGS, GRID_FILE, LOGS, Book, View, failure_line, has_baseline, summary
from launch.studies.trials import Trials
from tasks import TASKS
from tasks.base import Prompted


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


class Scheduler:
    """Runs a grid's cells through an executor, each cell as its own processes, and keeps grid.json and the display
    current."""

    def __init__(
        self,
        spec: GridSpec,
        cells: list[Cell],
        grid_dir: Path,
        launch_options: dict[str, Any],
        command: list[str],
        searches: list[searching.Search] | None = None,
        executor: Executor | None = None,
        needs: dict[str, Need] | None = None,
        retries: int = RETRIES,
    ):
        self.spec, self.cells, self.dir = spec, cells, grid_dir
        self.executor: Executor = executor or Machine(1, gpus=[])
        self.needs = needs or {}
        self.retries = retries
        self.launch_options = launch_options
        self.running: dict[str, tuple[Cell, CellRun]] = {}
        self.claims: dict[str, str] = {}  # baseline key -> the cell whose scoring includes the baseline
        self.clock = time.time()
        self.signals: list[int] = []
        self.told: set[str] = set()  # the running cells told about a signal
        # searches whose cells can still run (planning may have refused them all)
        self.searches = [s for s in searches or [] if any(c.status != REFUSED for c in s.cells)]
        known = {s.key: s.record(s.study()) for s in self.searches if (s.root / searching.STORAGE).is_file()}
        self.book = Book(spec, command, launch_options, self.executor.describe(), self.needs)
        self.book.searches = {
            s.key: known.get(s.key) or {"space": s.space, "metric": s.metric, "trials": []} for s in self.searches
        }
        self.trials = Trials(grid_dir, spec.name, launch_options, self._env, self.save, self.book.searches)
        finished = [c for c in cells if c.status == DONE]
        for cell in finished:
            if has_baseline(grid_dir, cell):
                self.book.baselines.setdefault(cell.baseline_key, cell.id)
        for cell in finished:
            cell.summary = summary(grid_dir, cell, self.book.baselines)

    # ---- grid.json and the display ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return self.book.state(self.cells)

    def save(self) -> None:
        rundir.write_json(self.dir / GRID_FILE, self.state())

    def view(self) -> View:
        return View(self.spec.name, self.clock, tuple(self.cells), len(self.running))

    # ---- one cell's commands -------------------------------------------------------------------------------------
    def _env(self, cell: Cell) -> dict[str, str]:
        extra = {"COLUMNS": os.environ.get("COLUMNS", "160")}
        if "mlflow" in (cell.values.get("report_to") or []):  # every cell in one experiment, the axes as tags
            tags = {"ftctl.grid": self.spec.name, **{f"ftctl.grid.{k}": str(v) for k, v in cell.labels().items()}}
            extra.update(MLFLOW_EXPERIMENT_NAME=self.spec.name, MLFLOW_TAGS=json.dumps(tags))
        return configs.child_environment(extra)

    def _log(self, cell: Cell) -> Path:
        return self.dir / LOGS / f"{cell.id}.log"

    def _train_argv(self, cell: Cell) -> list[str]:
        return ["--config", str(self.dir / CONFIGS / f"{cell.id}.yaml"), "--output-dir", str(self.dir / cell.id)]

    def _first_flag(self, cell: Cell) -> list[str]:
        if cell.status == INTERRUPTED:
            return ["--resume" if cell.resume else "--overwrite"]
        return []

    def train_command(self, cell: Cell) -> list[str]:
        """The cell's training command on its first attempt."""
        return cell_command(self.launch_options, [*self._train_argv(cell), *self._first_flag(cell)])

    def evaluate_args(self, cell: Cell) -> list[str]:
        """`ftctl evaluate` arguments for the cell, decided as it starts: the first of a (model, task) pair to start
        also scores the baseline (and the few-shot one, where the grid asks for it and the task is prompted). It
        claims the pair's baseline; if it fails, the next cell of the pair to start claims it."""
        args = [str(self.dir / cell.id)]
        key = cell.baseline_key
        if (self.spec.baseline or self.spec.few_shot) and key not in self.book.baselines and key not in self.claims:
            self.claims[key] = cell.id
            args += ["--baseline"] if self.spec.baseline else []
            if self.spec.few_shot and issubclass(TASKS.get(cell.task.name).cls, Prompted):
                args += ["--few-shot", str(self.spec.few_shot)]
        return args

    def _evaluate_here(self, cell: Cell, args: list[str]) -> int:
        """Score the cell with `launch.evaluate.main` in this process (one cell at a time): no second start of torch
        and transformers per cell, and evaluation reports no memory or speed figures that another process would have
        to isolate. Its output goes to the cell's log; any failure is the cell's, not the grid's."""
        cell.status, cell.stage, cell.step = TRAINED, "evaluate", None
        self.save()
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

    def _job(self, cell: Cell) -> CellJob:
        return CellJob(
            cell_id=cell.id,
            run_dir=self.dir / cell.id,
            log=self._log(cell),
            env=self._env(cell),
            launcher=self.launch_options,
            train=self._train_argv(cell),
            flag=self._first_flag(cell),
            # the scoring arguments now, in the grid's order: which cell scores a pair's baseline (whose untrained
            # head is seeded by that cell) does not depend on which cell finishes first
            evaluate=self.evaluate_args(cell),
            trained=cell.status == TRAINED,
            retries=self.retries,
            evaluate_here=lambda args: self._evaluate_here(cell, args),
        )

    def _write_config(self, cell: Cell) -> None:
        (self.dir / CONFIGS / f"{cell.id}.yaml").write_text(
            f"# cell {cell.id} of grid {self.spec.name}; repeat it with: ftctl train --config THIS_FILE "
            "--output-dir DIR\n" + yaml.safe_dump(cell.values, sort_keys=False),
            encoding="utf-8",
        )

    # ---- following a cell ----------------------------------------------------------------------------------------
    def _start(self, cell: Cell) -> bool:
        """Start the cell where the executor has room for it; False while it has none."""
        if cell.status != TRAINED:
            self._write_config(cell)
        claimed = set(self.claims)
        cell.attempts += 1
        cell.error, cell.step = None, None
        cell.started = time.time()
        cell.stage = "train" if cell.status != TRAINED else "evaluate"
        run = self.executor.start(self._job(cell), self.needs.get(cell.id) or Need(1))
        if run is None:  # no room now: as if not asked
            for key in set(self.claims) - claimed:
                del self.claims[key]
            cell.attempts -= 1
            cell.stage, cell.started = None, None
            return False
        cell.where = run.where
        self.running[cell.id] = (cell, run)
        self.save()
        return True

    def _progress(self, cell: Cell, run: CellRun) -> None:
        """The cell's stage, attempts and step, read from its run and its run directory (wherever it runs)."""
        if run.stage == "evaluate" and cell.stage == "train":
            cell.status, cell.stage, cell.step = TRAINED, "evaluate", None
            self.save()
        cell.attempts = max(cell.attempts, 1 + run.retried)
        if cell.stage == "train":
            event = last_event(self.dir / cell.id / EVENTS_FILE)
            if event and event.get("max_steps"):
                cell.step = (int(event["step"]), int(event["max_steps"]))

    def _poll(self, cell: Cell, run: CellRun) -> Cell | None:
        """One look at a running cell; the cell when it has ended."""
        self._progress(cell, run)
        outcome = run.poll()
        if outcome is None:
            return None
        self._progress(cell, run)
        self._ended(cell, outcome)
        del self.running[cell.id]
        self.save()
        return cell

    def _ended(self, cell: Cell, outcome: Outcome) -> None:
        """Done; or stopped before it was scored, on purpose (the next run continues it: planning looks at what is
        on disk) or by a failure."""
        cell.seconds, cell.stage = time.time() - (cell.started or time.time()), None
        key = cell.baseline_key
        if outcome.done:
            if self.claims.get(key) == cell.id:
                self.book.baselines[key] = cell.id
            cell.status = DONE
            cell.summary = summary(self.dir, cell, self.book.baselines)
            return
        if self.claims.get(key) == cell.id:
            del self.claims[key]
        if self.signals:
            cell.status = TRAINED if (self.dir / cell.id / rundir.RUN_FILE).is_file() else INTERRUPTED
        else:
            cell.status = FAILED
            cell.error = f"{outcome.stage}: {outcome.error or failure_line(self._log(cell), outcome.code)}"

    # ---- the grid ------------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        self.trials.signal(signum)

    def _forward_signal(self) -> None:
        """Each running cell is told once to checkpoint and stop: here, in the scheduling loop, not in the signal
        handler, so that a cell whose start the signal interrupted is told too, and none twice (a second signal
        stops a cell at once, without its checkpoint)."""
        for cell_id, (_, run) in list(self.running.items()):
            if cell_id not in self.told:
                self.told.add(cell_id)
                run.signal(self.signals[0])

    def run(self, max_cells: int | None, fail_fast: bool) -> None:
        todo = [c for c in self.cells if c.status not in FINAL]
        display = Display(self.view)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with display:
                for found in self.searches:
                    if self.signals:
                        break
                    if any(c.status not in FINAL for c in found.cells):
                        self.trials.run(found, display)
                queue = [c for c in todo if not (c.status == FAILED and (c.error or "").startswith("search:"))]
                self._run_cells(queue, display, max_cells, fail_fast)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for cell in self.cells:  # baselines scored meanwhile by another cell of the pair
                if cell.status == DONE:
                    cell.summary = summary(self.dir, cell, self.book.baselines)
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
                if self.signals or (max_cells is not None and started >= max_cells):
                    break
                if self._start(cell):
                    queue.remove(cell)
                    started += 1
                    display.event(cell, "start")
            if self.signals:
                self._forward_signal()
            if not self.running and queue and not stopping:
                # not reached: executor.check refused, at planning, a cell that cannot run even alone
                raise FtctlError(f"cell {queue[0].id} does not fit this machine even alone")
            for cell, run in list(self.running.values()):
                ended = self._poll(cell, run)
                if ended is not None:
                    display.event(ended, "end")
                    stopping = stopping or (fail_fast and ended.status == FAILED)
            if not self.running:
                if stopping or not queue:
                    return
                continue
            time.sleep(0.5)
