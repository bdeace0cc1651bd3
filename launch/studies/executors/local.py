"""`ftctl grid --jobs N` (the default with N = 1): this machine. Up to N cells at once, each on GPUs of its own
(`CUDA_VISIBLE_DEVICES`), packed by the planner's predicted memory per process and by the cell's process count; on
the CPU the cores are split between the cells (their torch threads)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ftctl.errors import FtctlError
from launch.studies.executors.base import (
    CellJob,
    MiB,
    Need,
    Outcome,
    ProcessJob,
    cell_command,
    evaluate_command,
    killed,
    resume_flag,
    tail,
)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where a cell runs on this machine: its GPUs (indices into the machine's), its torch threads per process and
    the memory it holds there (per GPU, or of the host on the CPU)."""

    gpus: tuple[int, ...]
    threads: int
    memory_mb: float

    def environment(self, names: list[str], split: bool) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(names[i] for i in self.gpus)
        if split:  # cells side by side: each process its share of the cores (torch reads OMP_NUM_THREADS)
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        return env


def gpu_names() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (a cell's list is a subset)."""
    import torch  # deferred: `ftctl grid --help` and a grid on Ray start without torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in visible.split(",") if n.strip()] if visible else []
    count = torch.cuda.device_count()
    return names[:count] if len(names) >= count else [str(i) for i in range(count)]


def _local_gpus() -> list[tuple[str, float]]:
    import torch  # deferred: as gpu_names

    names = gpu_names()
    return [(name, torch.cuda.get_device_properties(i).total_memory / MiB) for i, name in enumerate(names)]


def _available_host_mb() -> float:
    """The host memory cells may plan on: 90% of what is free as the grid starts."""
    import psutil  # deferred: only the local executor reads the host's memory

    return float(psutil.virtual_memory().available) / MiB * 0.9


class Machine:
    """This machine's GPUs, cores and memory, shared by up to `jobs` cells at a time."""

    kind = "local"

    def __init__(self, jobs: int, gpu_memory_mb: float | None = None, gpus: list[tuple[str, float]] | None = None):
        if jobs < 1:
            raise FtctlError(f"--jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        if gpus is None:
            gpus = _local_gpus()
        self.names = [name for name, _ in gpus]
        # the memory a cell may plan on per GPU: --gpu-memory where given (never more than the GPU has)
        self.capacity = [min(total, gpu_memory_mb) if gpu_memory_mb else total for _, total in gpus]
        self.used = [0.0] * len(gpus)
        self.cells_on = [0] * len(gpus)
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.host_mb = _available_host_mb()
        self.host_used = 0.0
        self.running = 0

    @property
    def device(self) -> str:
        return "cuda" if self.names else "cpu"

    @property
    def packs(self) -> bool:
        return self.jobs > 1

    def describe(self) -> dict[str, Any]:
        where = f"{len(self.names)} GPUs" if self.names else f"{self.cores} CPU cores"
        return {"kind": self.kind, "jobs": self.jobs, "devices": where}

    def check(self, cell_id: str, need: Need) -> None:
        """Refuse, before anything runs, a cell this machine can never hold."""
        if self.names and need.processes > len(self.names):
            raise FtctlError(
                f"cell {cell_id} needs {need.processes} GPUs (one per process) and this machine has "
                f"{len(self.names)}; lower launcher num_processes to {len(self.names)} or run the grid on Ray "
                "(--executor ray) with a bigger node"
            )
        if self.names and need.memory_mb and need.memory_mb > max(self.capacity):
            raise FtctlError(
                f"cell {cell_id} needs {need.memory_mb / 1024:.1f} GiB per GPU and the largest GPU here has "
                f"{max(self.capacity) / 1024:.1f} GiB; see `ftctl plan` with --gpu-memory for what would fit"
            )

    def start(self, job: CellJob, need: Need) -> LocalCell | None:
        slot = self.place(need)
        if slot is None:
            return None
        env = {**job.env, **slot.environment(self.names, split=self.jobs > 1)}
        where = ",".join(self.names[i] for i in slot.gpus) if slot.gpus else f"{slot.threads} threads"
        return LocalCell(self, slot, dataclasses.replace(job, env=env), where)

    def close(self) -> None:
        return None

    def place(self, need: Need) -> Slot | None:
        """A place for the cell now, or None while the running cells hold what it needs."""
        if self.running >= self.jobs:
            return None
        threads = max(1, self.cores // (self.jobs * need.processes))
        if not self.names:
            memory = (need.memory_mb or 0.0) * need.processes
            if self.running and self.host_used + memory > self.host_mb:
                return None  # the predicted memory of what runs would not leave room: wait for a cell to end
            self.running += 1
            self.host_used += memory
            return Slot((), threads, memory)
        chosen = self._gpus_for(need)
        if chosen is None:
            return None
        per_gpu = need.memory_mb if need.memory_mb else None
        for i in chosen:
            self.used[i] += per_gpu if per_gpu is not None else self.capacity[i]
            self.cells_on[i] += 1
        self.running += 1
        held = per_gpu if per_gpu is not None else -1.0  # -1: the whole GPU
        return Slot(tuple(chosen), threads, held)

    def _gpus_for(self, need: Need) -> list[int] | None:
        """Best fit: the fullest GPUs that still hold the cell's predicted memory per process (a cell without a
        prediction takes whole, unused GPUs), so that big cells later find empty ones."""
        if need.memory_mb:
            free = [i for i in range(len(self.names)) if self.capacity[i] - self.used[i] >= need.memory_mb]
            free.sort(key=lambda i: (self.capacity[i] - self.used[i], i))
        else:
            free = [i for i in range(len(self.names)) if self.cells_on[i] == 0]
        return free[: need.processes] if len(free) >= need.processes else None

    def release(self, slot: Slot) -> None:
        self.running -= 1
        if not slot.gpus:
            self.host_used -= slot.memory_mb
        for i in slot.gpus:
            self.used[i] -= self.capacity[i] if slot.memory_mb < 0 else slot.memory_mb
            self.cells_on[i] -= 1


class LocalCell:
    """A cell running on this machine: its training process, then its scoring (a process of its own on the cell's
    devices, or in the grid's process when cells run one at a time). A training that a signal the grid did not
    send ended runs again from its last checkpoint, `job.retries` times at most."""

    def __init__(self, machine: Machine, slot: Slot, job: CellJob, where: str):
        self.machine, self.slot, self.job, self.where = machine, slot, job, where
        self.retried = 0
        self.signalled = False
        self.code: int | None = None  # the exit code of a scoring done in the grid's process
        self.process: ProcessJob | None = None
        self.ended: Outcome | None = None
        if job.trained:
            self._score()
        else:
            self._train(job.flag)

    @property
    def stage(self) -> str:
        return self._stage

    def _train(self, flag: list[str]) -> None:
        self._stage = "train"
        cmd = cell_command(self.job.launcher, [*self.job.train, *flag])
        self.process = ProcessJob(cmd, self.job.log, self.job.env, "train")

    def _score(self) -> None:
        self._stage = "evaluate"
        if self.machine.jobs == 1 and self.job.evaluate_here is not None:
            self.process = None
            self.code = self.job.evaluate_here(self.job.evaluate)
            return
        self.process = ProcessJob(evaluate_command(self.job.evaluate), self.job.log, self.job.env, "evaluate")

    def poll(self) -> Outcome | None:
        if self.ended is not None:
            return self.ended
        code = self.code if self.process is None else self.process.poll()
        if code is None:
            return None
        if self._stage == "train":
            return self._trained(code)
        return self._end(Outcome("done") if code == 0 and self.job.scored_ok() else Outcome("evaluate", code))

    def _trained(self, code: int) -> Outcome | None:
        if code == 0 and self.job.trained_ok():
            self._score()
            return None
        log_tail = "\n".join(tail(self.job.log, 16384))
        if killed(code, log_tail) and not self.signalled and self.retried < self.job.retries:
            self.retried += 1  # killed, not by the grid: again, from its last checkpoint
            if self.job.trained_ok():  # killed after its run was complete: score it
                self._score()
            else:
                self._train(resume_flag(self.job.run_dir))
            return None
        return self._end(Outcome("train", code))

    def _end(self, outcome: Outcome) -> Outcome:
        self.ended = outcome
        self.machine.release(self.slot)
        return outcome

    def signal(self, signum: int) -> None:
        self.signalled = True
        if self.process is not None:
            self.process.signal(signum)
