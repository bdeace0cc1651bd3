"""What every executor shares: the `Executor` protocol the grid's scheduler drives (launch/studies/scheduler.py), the
`CellJob` it hands over, the `Outcome` a cell ends with, and the commands and processes of a cell.

An executor gives a cell a place and runs it there, whole: its training (retried from its last checkpoint when a
signal the grid did not send ends it), then its scoring. The scheduler only decides what starts next and records
what happened; it never asks which executor it has. A new executor (a SLURM one, say) is one module that implements
`Executor` and `CellRun`, and its test.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TextIO

from transformers.trainer_utils import get_last_checkpoint

from launch.run import launcher
from launch.run.rundir import RUN_FILE

MiB = 2**20
RETRIES = 2  # a cell whose process or node is killed (not by the grid) runs again this many times at most
EVAL_FILE = "eval.json"


@dataclasses.dataclass(frozen=True)
class Need:
    """What one cell asks of a machine: its processes (one GPU each on GPUs) and, when the planner predicted it, the
    memory each process needs (on a GPU: with the allocator's margin and the CUDA context)."""

    processes: int
    memory_mb: float | None = None


@dataclasses.dataclass(frozen=True)
class CellJob:
    """One cell's run, as any executor needs it: where it writes, its environment, its commands' arguments."""

    cell_id: str
    run_dir: Path
    log: Path
    env: dict[str, str]  # the whole environment of the cell's processes
    launcher: dict[str, Any]  # the grid's launcher options (accelerate), empty for a plain process
    train: list[str]  # `launch.train` arguments
    flag: list[str]  # --resume / --overwrite for the first attempt, as planning found the run directory
    evaluate: list[str]  # `launch.evaluate` arguments (with the pair's baseline, when this cell claimed it)
    trained: bool  # trained before: only scoring is left
    retries: int = RETRIES
    # score in the grid's own process (one cell at a time on this machine: no second start of torch); returns the
    # exit code. Executors that run cells elsewhere ignore it.
    evaluate_here: Callable[[list[str]], int] | None = None

    def trained_ok(self) -> bool:
        return (self.run_dir / RUN_FILE).is_file()

    def scored_ok(self) -> bool:
        return (self.run_dir / EVAL_FILE).is_file()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a cell's run ended: `done` (trained and scored), or the stage it stopped in with its exit code and, when
    the executor knows better than the log, why."""

    stage: str  # done | train | evaluate
    code: int = 0
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.stage == "done"


class CellRun(Protocol):
    """A cell running somewhere, as the scheduler follows it."""

    @property
    def stage(self) -> str: ...  # train | evaluate

    @property
    def where(self) -> str: ...  # what the live table and grid.json show: GPUs, threads, "ray"

    @property
    def retried(self) -> int: ...  # attempts made after the first (a killed training resumed)

    def poll(self) -> Outcome | None: ...  # None while it runs

    def signal(self, signum: int) -> None: ...  # checkpoint and stop (the grid was told to stop)


class Executor(Protocol):
    """Where a grid's cells run."""

    kind: str

    @property
    def device(self) -> str: ...  # cpu | cuda: what the cells' memory is predicted for

    @property
    def packs(self) -> bool: ...  # places cells by their predicted memory (then planning predicts it)

    def describe(self) -> dict[str, Any]: ...  # grid.json's `executor`

    def check(self, cell_id: str, need: Need) -> None: ...  # at planning: refuse a cell it can never run

    def start(self, job: CellJob, need: Need) -> CellRun | None: ...  # None: no room for it now

    def close(self) -> None: ...


# ---- the commands and processes of a cell ----------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on this machine now: each multi-process cell gets its own rendezvous port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cell_command(launch_options: dict[str, Any], argv: list[str]) -> list[str]:
    """The training command of a cell: `launch.train`, through accelerate when the grid has a launcher (with a
    rendezvous port of its own, so that cells side by side do not meet on accelerate's default one)."""
    if not launch_options:
        return [sys.executable, "-m", "launch.train", *argv]
    options = {"rendezvous_timeout": 300, **launch_options}
    if (options.get("num_processes") or 1) > 1 and not options.get("main_process_port"):
        options["main_process_port"] = free_port()
    return launcher.build_command(options, argv)


def evaluate_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch.evaluate", *args]


def resume_flag(run_dir: Path) -> list[str]:
    """What a cell's training is told about the directory it finds: continue from its newest checkpoint, start
    again over what an attempt without one left, or nothing for a fresh directory."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return []
    return ["--resume"] if get_last_checkpoint(str(run_dir)) else ["--overwrite"]


def stop_with_parent() -> None:
    """In a cell's process, before it starts: SIGTERM when the process that started it dies (the grid, or a Ray
    worker), so that the cell checkpoints and stops instead of running on alone. Linux only."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def log_header(out: TextIO, what: str, text: str) -> None:
    """The line that opens one part of a cell's log: when, which stage, and what ran (or why nothing did)."""
    out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {text}\n")
    out.flush()


class ProcessJob:
    """One process of a cell (training or scoring), its output appended to the cell's log, in its own session: a
    Ctrl-C in the terminal reaches the grid only, which passes exactly one on."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str], what: str, keep: tuple[int, ...] = ()):
        with log.open("a", encoding="utf-8") as out:
            log_header(out, what, shlex.join(cmd))
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=os.getcwd(),
                env=env,
                start_new_session=True,
                preexec_fn=stop_with_parent,
                pass_fds=keep,
            )

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)  # the cell checkpoints and stops; a second signal stops it at once

    def wait(self) -> int:
        return self.proc.wait()


# how torch's elastic launcher (under accelerate launch) reports a worker that a signal ended
WORKER_KILLED = re.compile(r"Signal \d+ \(SIG[A-Z]+\) received by PID")


def killed(code: int | None, log_tail: str = "") -> bool:
    """Whether a cell's process, or one of the workers accelerate launched, was ended by a signal (the kernel's OOM
    killer, a preempted node): worth another attempt from its checkpoint, when the grid did not send it."""
    return code is not None and (code < 0 or (code != 0 and bool(WORKER_KILLED.search(log_tail))))


def tail(path: Path, size: int = 8192) -> list[str]:
    """The last `size` bytes of a log, as lines (none when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
