"""Where a grid's cells run. The runner (launch/studies/runner.py) decides what runs next and keeps grid.json; an
executor gives a cell a place and starts its processes there:

- `Machine` (`ftctl grid --jobs N`, the default with N = 1): this machine. Up to N cells at once, each on GPUs of its
  own (`CUDA_VISIBLE_DEVICES`), packed by the planner's predicted memory per process and by the cell's process count;
  on the CPU the cores are split between the cells (their torch threads).
- `RayCluster` (`ftctl grid --executor ray [--ray-address ADDR]`): each cell is one Ray task that asks for the cell's
  GPUs (one per process) or CPUs and predicted memory, and runs the cell's training (through accelerate when the
  grid has a launcher) and scoring on the node Ray chose, all processes of a cell on that node. A task whose worker
  or node dies is retried a bounded number of times; the retry resumes from the cell's last checkpoint.

Both run a cell as the same commands (`cell_command`, `evaluate_command`): what a grid computes does not depend on
where it ran.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ftctl.errors import FtctlError
from launch.run import launcher

MiB = 2**20
RETRIES = 2  # a cell whose process or node is killed (not by the grid) runs again this many times at most


# ---- what a cell asks for, and where it got it ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Need:
    """What one cell asks of a machine: its processes (one GPU each on GPUs) and, when the planner predicted it, the
    memory each process needs (on a GPU: with the allocator's margin and the CUDA context)."""

    processes: int
    memory_mb: float | None = None


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
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in visible.split(",") if n.strip()] if visible else []
    count = torch.cuda.device_count()
    return names[:count] if len(names) >= count else [str(i) for i in range(count)]


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


def _local_gpus() -> list[tuple[str, float]]:
    import torch

    names = gpu_names()
    return [(name, torch.cuda.get_device_properties(i).total_memory / MiB) for i, name in enumerate(names)]


def _available_host_mb() -> float:
    """The host memory cells may plan on: 90% of what is free as the grid starts."""
    import psutil

    return float(psutil.virtual_memory().available) / MiB * 0.9


# ---- the commands of a cell ------------------------------------------------------------------------------------
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
    from transformers.trainer_utils import get_last_checkpoint

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


class ProcessJob:
    """One process of a cell (training or scoring), its output appended to the cell's log, in its own session: a
    Ctrl-C in the terminal reaches the grid only, which passes exactly one on."""

    def __init__(
        self, cmd: list[str], log: Path, env: dict[str, str], what: str, keep: tuple[int, ...] = (), **info: Any
    ):
        self.info = info
        with log.open("a", encoding="utf-8") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {shlex.join(cmd)}\n")
            out.flush()
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


# ---- a cell as one Ray task --------------------------------------------------------------------------------------
def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """A whole cell where Ray placed it: its training, then its scoring, as processes of this node. Holds the cell's
    lock file while they run, so that a retry after a lost worker waits until the training that worker started
    (told to stop when it died) has written its checkpoint; the retry then continues from that checkpoint."""

    run_dir, log = Path(job["run_dir"]), Path(job["log"])
    env = {**os.environ, **job["env"]}
    with open(job["lock"], "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = Path(job["marker"])
        retry = marker.is_file() and marker.read_text() == job["token"]
        marker.write_text(job["token"])
        if not job["trained"]:
            flag = resume_flag(run_dir) if retry else job["flag"]
            cmd = cell_command(job["launcher"], [*job["train"], *flag])
            code = _foreground(cmd, log, env, "train" + (" (retried)" if retry else ""), lock.fileno())
            if code or not (run_dir / "run.json").is_file():
                return {"stage": "train", "code": code, "node": socket.gethostname()}
        code = _foreground(evaluate_command(job["evaluate"]), log, env, "evaluate", lock.fileno())
        return {"stage": "evaluate", "code": code, "node": socket.gethostname()}


def _foreground(cmd: list[str], log: Path, env: dict[str, str], what: str, lock: int) -> int:
    """Run one process of the cell to its end; cancelled (the grid was stopped), it is told to checkpoint and stop,
    and waited for. Its copy of the lock file keeps the cell locked until it is gone."""
    job = ProcessJob(cmd, log, env, what, keep=(lock,))
    try:
        while job.poll() is None:  # not a blocking wait: Ray's cancel arrives as KeyboardInterrupt between steps
            time.sleep(0.5)
        return job.wait()
    except KeyboardInterrupt:  # ray.cancel: the grid got Ctrl-C or SIGTERM
        job.signal(signal.SIGTERM)
        return job.wait()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FtctlError(
            "--executor ray needs Ray, which is not installed: pip install 'ftctl[ray]' (or pip install 'ray>=2.9')"
        ) from None
    return ray


def _reachable(address: str) -> None:
    """Refuse an address nothing answers at, in seconds (Ray itself retries for minutes)."""
    if address in ("auto", "local"):
        return
    plain = address.split("://", 1)[-1]
    host, _, port = plain.rpartition(":") if ":" in plain else (plain, "", "")
    port_number = int(port) if port.isdigit() else (10001 if address.startswith("ray://") else 6379)
    try:
        with socket.create_connection((host or plain, port_number), timeout=5):
            pass
    except OSError as exc:
        raise FtctlError(
            f"--ray-address {address}: nothing answers at {host or plain}:{port_number} ({exc.strerror or exc}); "
            "start the cluster (`ray start --head` on its head node) or give its address (HOST:6379)"
        ) from None


class RayCluster:
    """A Ray cluster: the one at `address`, or a local one started for this grid (a laptop, one big machine)."""

    kind = "ray"

    def __init__(self, address: str | None, grid_dir: Path, retries: int = RETRIES):
        ray = self.ray = _ray()
        if address:
            _reachable(address)
        try:
            ray.init(
                address=address or None,
                include_dashboard=False,
                log_to_driver=False,  # each cell's output goes to its log, as on this machine
                logging_level=logging.WARNING,  # not Ray's INFO lines: an error stays one line
            )
        except ConnectionError as exc:
            why = str(exc).splitlines()[0]
            if "Auth" in type(exc.__cause__).__name__:  # the cluster wants a token this process does not have
                why += (
                    ": the cluster asks for its authentication token; give it as RAY_AUTH_TOKEN (or in "
                    "~/.ray/auth_token) with RAY_AUTH_MODE=token"
                )
            raise FtctlError(f"--ray-address {address}: {why}") from None
        self.address, self.retries = address, retries
        self.nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.gpus = max((n["Resources"].get("GPU", 0) for n in self.nodes), default=0)
        self.cpus = max((n["Resources"].get("CPU", 0) for n in self.nodes), default=0)
        self.remote = ray.remote(run_cell)
        check_shared(ray, self.nodes, grid_dir)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus else "cpu"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "address": self.address or "local",
            "nodes": len(self.nodes),
            "devices": f"{int(sum(n['Resources'].get('GPU', 0) for n in self.nodes))} GPUs"
            if self.gpus
            else f"{int(sum(n['Resources'].get('CPU', 0) for n in self.nodes))} CPUs",
            "retries": self.retries,
        }

    def check(self, cell_id: str, need: Need) -> None:
        if self.gpus and need.processes > self.gpus:
            raise FtctlError(
                f"cell {cell_id} needs {need.processes} GPUs on one node (one per process) and the largest node of "
                f"the Ray cluster has {int(self.gpus)}; lower launcher num_processes or add a bigger node"
            )
        if not self.gpus and need.processes > self.cpus:
            raise FtctlError(
                f"cell {cell_id} needs {need.processes} CPUs on one node (one per process) and the largest node of "
                f"the Ray cluster has {int(self.cpus)}; lower launcher num_processes"
            )

    def submit(self, job: dict[str, Any], need: Need) -> RayJob:
        """The cell as a Ray task: one GPU per process (all on one node: Ray places a task whole), or on a CPU
        cluster one CPU per process and the predicted memory; retried when its worker or node dies."""
        if self.gpus:
            resources: dict[str, Any] = {"num_gpus": need.processes, "num_cpus": need.processes}
        else:
            resources = {"num_cpus": need.processes, "num_gpus": 0}
            if need.memory_mb:
                resources["memory"] = int(need.memory_mb * need.processes * MiB)
            job = {**job, "env": {**job["env"], "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
        options = {**resources, "max_retries": self.retries, "retry_exceptions": False}
        return RayJob(self.ray, self.remote.options(**options).remote(job), Path(job["lock"]))

    def shutdown(self) -> None:
        self.ray.shutdown()


class RayJob:
    """A cell running as a Ray task, seen from the grid."""

    def __init__(self, ray: Any, ref: Any, lock: Path):
        self.ray, self.ref, self.lock = ray, ref, lock
        self.result: dict[str, Any] | None = None
        self.error: str | None = None

    def poll(self) -> int | None:
        if self.result is not None:
            return int(self.result["code"])
        ready, _ = self.ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            self.result = self.ray.get(self.ref)
        except Exception as exc:  # noqa: BLE001  the task's failure is the cell's, not the grid's
            name = type(exc).__name__
            self.error = (
                f"{name}: its Ray worker or node died on every attempt"
                if "Crashed" in name or ("NodeDied" in name)
                else f"{name}: {(str(exc).strip().splitlines() or [''])[-1][:200]}"
            )
            self.result = {"stage": "train", "code": 1}
        return int(self.result["code"])

    def signal(self, signum: int) -> None:
        """Stop the cell: its task is cancelled, which tells its process to checkpoint and stop."""
        with contextlib.suppress(Exception):
            self.ray.cancel(self.ref, force=False)

    def wait(self, timeout: float = 600) -> None:
        """Until the cell's processes are gone (they hold its lock until they are)."""
        deadline = time.time() + timeout
        with open(self.lock, "a+") as lock:
            while time.time() < deadline:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    time.sleep(0.5)


def _sees(path: str, token: str) -> tuple[str, bool]:
    """On one node: whether it reads `token` at `path`."""
    try:
        return socket.gethostname(), Path(path).read_text() == token
    except OSError:
        return socket.gethostname(), False


def check_shared(ray: Any, nodes: list[dict[str, Any]], grid_dir: Path) -> None:
    """Every node must see the grid directory: each writes its cells' checkpoints and results there, and a retry on
    another node resumes from them. A file written here is read back on every node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    grid_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = grid_dir / f".ray-shared-{token}"
    probe.write_text(token)
    try:
        sees = ray.remote(_sees)
        refs = [
            sees.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(probe.resolve()), token)
            for node in nodes
        ]
        answers = ray.get(refs, timeout=120)
    finally:
        probe.unlink(missing_ok=True)
    seen = zip(nodes, answers, strict=True)
    blind = [f"{node['NodeManagerAddress']} ({host}, node {node['NodeID'][:8]})" for node, (host, ok) in seen if not ok]
    if blind:
        raise FtctlError(
            f"the grid directory {grid_dir.resolve()} is not shared with Ray node {', '.join(blind)}: every node "
            "writes its cells there; put it on a filesystem all nodes mount (NFS, Lustre, ...) with --output-dir"
        )
