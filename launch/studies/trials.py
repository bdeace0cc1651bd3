"""A grid's searches, run before its cells (launch/studies/search.py says what is searched and how): each trial is
a training process on this machine, scored on a split carved out of the training data; its evaluations are reported
to Optuna's pruner as it writes them, and a pruned trial is stopped (SIGTERM: it checkpoints and exits like any
stopped run). A signal leaves the running trial as it is: the next run of the grid takes it up again."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from transformers.trainer_utils import get_last_checkpoint

from launch.studies import search as searching
from launch.studies.display import Display
from launch.studies.executors import ProcessJob, cell_command
from launch.studies.spec import FAILED, Cell
from launch.studies.state import LOGS, failure_line


class Trials:
    """Runs searches' trials for the scheduler: one process at a time, which a signal reaches (`signal`)."""

    def __init__(
        self,
        grid_dir: Path,
        grid_name: str,
        launch_options: dict[str, Any],
        env: Callable[[Cell], dict[str, str]],
        save: Callable[[], None],
        records: dict[str, Any],
    ):
        self.dir, self.grid_name, self.launch_options = grid_dir, grid_name, launch_options
        self.env, self.save, self.records = env, save, records
        self.signals: list[int] = []
        self.process: ProcessJob | None = None

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.process is not None:
            self.process.signal(signum)

    def run(self, found: searching.Search, display: Display) -> None:
        """A search's trials (first those a signal interrupted last time), then its cells get the best values."""
        study = found.study()
        try:
            for trial in searching.interrupted(study):
                if self.signals:
                    return
                self._trial(found, study, trial, display)
            while not self.signals and not found.finished(study):
                self._trial(found, study, searching.ask(study, found.space), display)
        finally:
            for cell in found.cells:
                cell.stage, cell.step = None, None
            self.records[found.key] = found.record(study)
            self.save()
        if not self.signals:
            self._choose(found, study, display)

    def _choose(self, found: searching.Search, study: Any, display: Display) -> None:
        best = found.best(study)
        if best is None:
            errors = [t["error"] for t in self.records[found.key]["trials"] if t.get("error")]
            for cell in found.cells:
                cell.status = FAILED
                cell.error = "search: no trial finished" + (f" ({errors[-1]})" if errors else "")
            self.save()
            return
        found.apply(best)
        display.message(f"search {found.key}: {best['params']} ({found.metric} {best['value']:.4f})")

    def _argv(self, found: searching.Search, trial: Any) -> tuple[list[str], Path]:
        """The trial's training arguments (its config file written beside its run directory), and that directory."""
        run_dir = found.trial_dir(trial.number)
        config = run_dir.with_suffix(".yaml")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            f"# search trial {trial.number} of {found.key} (grid {self.grid_name})\n"
            + yaml.safe_dump(found.trial_config(dict(trial.params)), sort_keys=False),
            encoding="utf-8",
        )
        argv = ["--config", str(config), "--output-dir", str(run_dir)]
        if run_dir.is_dir() and any(run_dir.iterdir()):
            argv.append("--resume" if get_last_checkpoint(str(run_dir)) else "--overwrite")
        return argv, run_dir

    def _trial(self, found: searching.Search, study: Any, trial: Any, display: Display) -> None:
        """One trial: a training process whose evaluations are reported to the pruner, which may stop it."""
        params = dict(trial.params)
        argv, run_dir = self._argv(found, trial)
        for cell in found.cells:
            cell.stage, cell.step = "search", (trial.number + 1, found.size())
        self.save()
        earlier = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        report = Reporter(trial, found.metric, run_dir, set(earlier.intermediate_values))
        log = self.dir / LOGS / f"search__{found.key}__trial-{trial.number}.log"
        cmd = cell_command(self.launch_options, argv)
        code = self._process(cmd, log, found.cells[0], f"search trial {params}", report)
        value = searching.trial_value(run_dir, found.metric) if code == 0 else None
        if report.pruned:
            searching.tell(study, trial, state=searching.trial_state("PRUNED"))
        elif value is not None:
            searching.tell(study, trial, value)
        elif self.signals:
            return  # left running: the next run of the grid resumes it
        else:
            trial.set_user_attr("error", failure_line(log, code))
            searching.tell(study, trial, state=searching.trial_state("FAIL"))
        outcome = "pruned" if report.pruned else f"{found.metric} {value:.4f}" if value is not None else "failed"
        display.message(f"search {found.key} trial {trial.number} {params}: {outcome}")

    def _process(self, cmd: list[str], log: Path, cell: Cell, what: str, report: Reporter) -> int:
        """Run one trial's process to its end (its output into `log`), reporting what it wrote twice a second."""
        self.process = job = ProcessJob(cmd, log, self.env(cell), what)
        try:
            while job.poll() is None:
                time.sleep(0.5)
                report(job)
            report(job)  # what it wrote last
            return job.wait()
        finally:
            self.process = None


class Reporter:
    """Reports a running trial's new evaluations to the pruner, once each (a resumed run repeats some), and stops
    the trial when the pruner says so."""

    def __init__(self, trial: Any, metric: str, run_dir: Path, seen: set[int]):
        self.trial, self.metric, self.run_dir, self.seen = trial, metric, run_dir, seen
        self.pruned = False

    def __call__(self, job: ProcessJob) -> None:
        if self.pruned:  # stopping: what it evaluates meanwhile is not reported
            return
        for event in searching.evaluations(self.run_dir):
            done = searching.percent_done(event)
            value = (event.get("metrics") or {}).get(self.metric)
            if done is None or done in self.seen or not isinstance(value, (int, float)):
                continue
            self.seen.add(done)
            self.trial.report(float(value), done)
            if self.trial.should_prune():
                self.pruned = True
                if job.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(job.proc.pid, signal.SIGTERM)
                return
