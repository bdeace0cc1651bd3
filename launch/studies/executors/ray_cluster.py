"""`ftctl grid --executor ray [--ray-address ADDR]`: each cell is one Ray task that asks for the cell's GPUs (one per
process) or CPUs and predicted memory, and runs the cell's training (through accelerate when the grid has a launcher)
and scoring on the node Ray chose, all processes of a cell on that node. A task whose worker or node dies is retried
a bounded number of times; the retry resumes from the cell's last checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from ftctl.errors import FtctlError
from launch.run.rundir import RUN_FILE
from launch.studies.executors.base import (
    RETRIES,
    CellJob,
    MiB,
    Need,
    Outcome,
    ProcessJob,
    cell_command,
    evaluate_command,
    log_header,
    resume_flag,
)


# ---- a cell as one Ray task, on its node -------------------------------------------------------------------------
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
        if retry and (run_dir / RUN_FILE).is_file():  # the attempt whose worker died had finished training
            with log.open("a", encoding="utf-8") as out:
                log_header(out, "train (retried)", "finished by the earlier attempt before its worker died; scoring it")
        elif not job["trained"]:
            flag = resume_flag(run_dir) if retry else job["flag"]
            cmd = cell_command(job["launcher"], [*job["train"], *flag])
            code = _foreground(cmd, log, env, "train" + (" (retried)" if retry else ""), lock.fileno())
            if code or not (run_dir / RUN_FILE).is_file():
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


# ---- the cluster, seen from the grid -----------------------------------------------------------------------------
def _ray() -> Any:
    try:
        import ray  # deferred: Ray is an optional extra (ftctl[ray]), imported only for --executor ray
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
    packs = True  # Ray places each task by the resources it asks for: the predicted memory among them

    def __init__(self, address: str | None, grid_dir: Path, retries: int = RETRIES):
        ray = self.ray = _ray()
        if address:
            _reachable(address)
        try:
            ray.init(
                # no address: a new local cluster, never one `ray start` left running here (--ray-address auto joins it)
                address=address or "local",
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
        total = sum(n["Resources"].get("GPU" if self.gpus else "CPU", 0) for n in self.nodes)
        return {
            "kind": self.kind,
            "address": self.address or "local",
            "nodes": len(self.nodes),
            "devices": f"{int(total)} GPUs" if self.gpus else f"{int(total)} CPUs",
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

    def start(self, job: CellJob, need: Need) -> RayCell:
        """The cell as a Ray task: one GPU per process (all on one node: Ray places a task whole), or on a CPU
        cluster one CPU per process and the predicted memory; retried when its worker or node dies. Ray queues what
        does not fit now: a cell always starts."""
        env = {k: v for k, v in job.env.items() if os.environ.get(k) != v}  # the node has its own environment
        if self.gpus:
            resources: dict[str, Any] = {"num_gpus": need.processes, "num_cpus": need.processes}
        else:
            resources = {"num_cpus": need.processes, "num_gpus": 0}
            if need.memory_mb:
                resources["memory"] = int(need.memory_mb * need.processes * MiB)
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        task = {
            "run_dir": str(job.run_dir),
            "log": str(job.log),
            "lock": str(job.log.with_suffix(".lock")),
            "marker": str(job.log.with_suffix(".attempt")),
            "token": uuid.uuid4().hex,  # a retry of this submission finds it and resumes from what is on disk
            "env": env,
            "launcher": job.launcher,
            "trained": job.trained,
            "train": job.train,
            "flag": job.flag,
            "evaluate": job.evaluate,
        }
        options = {**resources, "max_retries": self.retries, "retry_exceptions": False}
        return RayCell(self.ray, self.remote.options(**options).remote(task), job)

    def close(self) -> None:
        self.ray.shutdown()


@dataclasses.dataclass
class RayCell:
    """A cell running as a Ray task, seen from the grid."""

    ray: Any
    ref: Any
    job: CellJob
    where: str = "ray"
    retried: int = 0  # Ray retries a task itself
    signalled: bool = False

    @property
    def stage(self) -> str:
        return "evaluate" if self.job.trained or self.job.trained_ok() else "train"

    def poll(self) -> Outcome | None:
        ready, _ = self.ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        if self.signalled:
            self.wait()  # its processes checkpoint before the grid says it stopped
        try:
            result = self.ray.get(self.ref)
        except Exception as exc:  # noqa: BLE001  the task's failure is the cell's, not the grid's
            name = type(exc).__name__
            why = (
                f"{name}: its Ray worker or node died on every attempt"
                if "Crashed" in name or "NodeDied" in name
                else f"{name}: {(str(exc).strip().splitlines() or [''])[-1][:200]}"
            )
            return Outcome("train", 1, why)
        code = int(result["code"])
        if result.get("stage") == "train" or code:
            return Outcome(str(result.get("stage", "train")), code)
        return Outcome("done") if self.job.scored_ok() else Outcome("evaluate", code)

    def signal(self, signum: int) -> None:
        """Stop the cell: its task is cancelled, which tells its process to checkpoint and stop."""
        self.signalled = True
        with contextlib.suppress(Exception):
            self.ray.cancel(self.ref, force=False)

    def wait(self, timeout: float = 600) -> None:
        """Until the cell's processes are gone (they hold its lock until they are)."""
        deadline = time.time() + timeout
        with open(self.job.log.with_suffix(".lock"), "a+") as lock:
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
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # deferred: as _ray

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
