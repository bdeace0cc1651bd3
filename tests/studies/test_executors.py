"""Where a grid's cells run: `--jobs N` on this machine and `--executor ray` on a (local, real) Ray cluster give the
same metrics and the same weights as one cell at a time; a cell whose process (or Ray worker) is killed mid-training
is retried and resumes from its checkpoint to the weights of an uninterrupted run; bad executor options are one
line and exit code 2, before anything is written; cells are packed onto GPUs by their predicted memory and their
process count."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file

from ftctl.errors import FtctlError
from launch.studies import grid
from launch.studies.executors import Machine, Need, free_port, killed

# long enough to be killed mid-way; a checkpoint every 10 steps to resume from
SETTINGS = {
    "max_steps": 40,
    "save_every": 10,
    "keep_last": 10,
    "batch_size": 8,
    "learning_rate": 5e-3,
    "logging_steps": 1,
    "report_to": "none",
    "plan": False,
}
CELLS = [f"tinybert__sst2__{m}__seed{s}" for m in ("lora", "head") for s in (1, 2)]


def write_grid(path: Path, models: dict, data: dict, **extra) -> Path:
    spec = {
        "name": "exec",
        "models": {"tinybert": str(models["bert"])},
        "tasks": {"sst2": {k: str(data[k.removesuffix("_file")]) for k in ("train_file", "validation_file")}},
        "methods": ["lora", "head"],
        "seeds": [1, 2],
        "baseline": True,
        "settings": dict(SETTINGS),
        **extra,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def one_thread() -> dict[str, str]:
    """The reference runs one cell at a time on one thread, as each of two cells side by side on two cores does:
    the comparison is then of the executors, not of float sums over another thread count."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def ftctl(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.Popen:
    exe = str(Path(sys.executable).parent / "ftctl")
    return subprocess.Popen(
        [exe, *args], cwd=cwd, env=env or one_thread(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finished(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run_dir / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(run_dir / name))


def results(grid_dir: Path) -> dict[str, tuple[dict, dict, dict]]:
    """Each cell's scores, validation metrics and weights; the (model, task) baseline under "baseline", whichever
    cell scored it."""
    out: dict = {}
    for cell in CELLS:
        scored = json.loads((grid_dir / cell / "eval.json").read_text())
        if "baseline" in scored:
            assert "baseline" not in out, "the baseline was scored twice"
            out["baseline"] = {k: v for k, v in scored["baseline"].items() if k != "details"}  # details: timings
        metrics = json.loads((grid_dir / cell / "run.json").read_text())["metrics"]
        kept = {k: v for k, v in scored.items() if k not in ("info", "details", "baseline", "baseline_kind")}
        out[cell] = (kept, metrics, weights(grid_dir / cell))
    return out


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert got.pop("baseline") == expected["baseline"]
    for cell in CELLS:
        scored, metrics, tensors = expected[cell]
        assert got[cell][0] == scored, cell
        assert got[cell][1] == metrics, cell
        assert got[cell][2].keys() == tensors.keys()
        for name in tensors:
            assert torch.equal(got[cell][2][name], tensors[name]), (cell, name)


def training_process(run_dir: Path, after_checkpoint: int, proc: subprocess.Popen) -> psutil.Process:
    """The training process of one cell, once its checkpoint `after_checkpoint` is written."""
    deadline = time.time() + 600
    while not (run_dir / f"checkpoint-{after_checkpoint}" / "spec.json").is_file():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{run_dir.name} wrote no checkpoint-{after_checkpoint}"
        time.sleep(0.1)
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if "launch.train" in cmdline and str(run_dir) in cmdline:
            return p
    raise AssertionError(f"no training process of {run_dir.name}")


def hold_at_step(run_dirs: list[Path], step: int, proc: subprocess.Popen) -> list[psutil.Process]:
    """The training process of each cell, stopped (SIGSTOP) as soon as it has logged `step`, until all of them
    have: none runs far ahead, or to its end, while a slower one is still starting (Ray starts the second late)."""
    held: dict[Path, psutil.Process] = {}
    deadline = time.time() + 600
    while len(held) < len(run_dirs):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        for run_dir in run_dirs:
            events = run_dir / "events.jsonl"
            if run_dir not in held and events.is_file() and f'"step": {step}' in events.read_text():
                held[run_dir] = next(
                    p
                    for p in psutil.process_iter(["cmdline"])
                    if "launch.train" in (p.info["cmdline"] or []) and str(run_dir) in (p.info["cmdline"] or [])
                )
                held[run_dir].suspend()
        time.sleep(0.05)
    return [held[d] for d in run_dirs]


def signal_pending(process: psutil.Process, signum: int) -> bool:
    """Whether `signum` waits to be delivered to a stopped process (Linux: /proc/PID/status)."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        key, _, mask = line.partition(":")
        if key in ("SigPnd", "ShdPnd") and int(mask, 16) >> (signum - 1) & 1:
            return True
    return False


def overlapped(grid_dir: Path, a: str, b: str) -> bool:
    """Whether two cells trained at the same time (their events' first and last stamps)."""

    def span(cell: str) -> tuple[float, float]:
        stamps = [json.loads(line)["time"] for line in (grid_dir / cell / "events.jsonl").read_text().splitlines()]
        return min(stamps), max(stamps)

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


@pytest.fixture(scope="module")
def reference(models, data, tmp_path_factory) -> dict:
    """The grid run one cell at a time, uninterrupted."""
    base = tmp_path_factory.mktemp("reference")
    spec = write_grid(base / "g.yaml", models, data)
    finished(ftctl("grid", str(spec), "--output-dir", str(base / "grid")))
    return results(base / "grid")


@pytest.mark.slow
def test_jobs_2_equals_one_at_a_time_and_a_killed_cell_resumes(models, data, reference, tmp_path):
    spec = write_grid(tmp_path / "g.yaml", models, data)
    out = tmp_path / "grid"
    proc = ftctl(
        "grid", str(spec), "--output-dir", str(out), "--jobs", "2", env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    victim = out / CELLS[0]
    training_process(victim, 20, proc).kill()  # SIGKILL: no checkpoint of its own; the one at step 20 stays
    finished(proc)

    state = json.loads((out / "grid.json").read_text())
    cells = {c["id"]: c for c in state["cells"]}
    assert state["status"] == "completed" and state["executor"] == {
        "kind": "local",
        "jobs": 2,
        "devices": "2 CPU cores",
    }
    assert cells[CELLS[0]]["attempts"] == 2 and all(cells[c]["attempts"] == 1 for c in CELLS[1:])
    assert all(c["where"] == "1 threads" for c in cells.values())  # two cores, two cells: one thread each
    retried = (out / "logs" / f"{CELLS[0]}.log").read_text().split("==== ")
    assert "--resume" in [part for part in retried if " train: " in part][-1].splitlines()[0]
    assert json.loads((victim / "checkpoint-40" / "trainer_state.json").read_text())["global_step"] == 40
    assert any(overlapped(out, a, b) for a, b in itertools.combinations(CELLS, 2))  # side by side, really
    # the baseline of the (model, task) pair is scored once, by one cell, and shared
    assert len({c["baseline_cell"] for c in cells.values()}) == 1
    assert_same(results(out), reference)


@pytest.mark.slow
def test_ray_runs_the_grid_and_retries_a_cell_whose_worker_died(models, data, reference, tmp_path):
    pytest.importorskip("ray", reason="Ray is installed with ftctl's dev extras (CI installs them)")
    spec = write_grid(tmp_path / "g.yaml", models, data)
    out = tmp_path / "grid"
    proc = ftctl("grid", str(spec), "--output-dir", str(out), "--executor", "ray", cwd=tmp_path)
    victim = out / CELLS[1]
    training = training_process(victim, 10, proc)
    training.suspend()  # held until its worker is gone: the SIGTERM the worker's death sends waits for it
    worker = training.parent()  # the Ray worker running the cell's task
    assert worker is not None and "ray" in " ".join(worker.cmdline()).lower()
    worker.kill()  # Ray retries the task; its training, told to stop as its worker died, checkpoints first
    worker.wait(timeout=60)
    training.resume()
    finished(proc)

    state = json.loads((out / "grid.json").read_text())
    assert state["status"] == "completed" and state["executor"]["kind"] == "ray"
    log = (out / "logs" / f"{CELLS[1]}.log").read_text()
    retried = [part for part in log.split("==== ") if " train (retried): " in part]
    assert len(retried) == 1 and "--resume" in retried[0].splitlines()[0], log[-3000:]
    assert_same(results(out), reference)


@pytest.mark.slow
@pytest.mark.parametrize("executor", [["--jobs", "2"], ["--executor", "ray"]], ids=["jobs2", "ray"])
def test_sigterm_checkpoints_every_running_cell_and_the_rerun_resumes_them(models, data, tmp_path, executor):
    if "ray" in executor:
        pytest.importorskip("ray", reason="Ray is installed with ftctl's dev extras (CI installs them)")
    spec = write_grid(
        tmp_path / "g.yaml", models, data, seeds=[1], settings={**SETTINGS, "max_steps": 2000, "save_every": 5000}
    )
    out = tmp_path / "grid"
    plain = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = ftctl("grid", str(spec), "--output-dir", str(out), *executor, env=plain, cwd=tmp_path)
    names = ["tinybert__sst2__lora__seed1", "tinybert__sst2__head__seed1"]
    held = hold_at_step([out / n for n in names], 5, proc)
    proc.send_signal(signal.SIGTERM)
    for training in held:  # let each go once the grid has passed it the signal: it checkpoints and stops
        deadline = time.time() + 120
        while not signal_pending(training, signal.SIGTERM):
            assert time.time() < deadline, "the grid did not pass SIGTERM on to a running cell"
            time.sleep(0.1)
        training.resume()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped: SIGTERM received: the grid stopped during cell" in err and all(n in err for n in names)
    state = {c["id"]: c for c in json.loads((out / "grid.json").read_text())["cells"]}
    for name in names:  # each running cell wrote a checkpoint as it stopped, and nothing claims it finished
        assert state[name]["status"] == "interrupted" and list((out / name).glob("checkpoint-*")), name
        assert not (out / name / "run.json").exists()

    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    finished(ftctl("grid", str(spec), "--output-dir", str(out), *executor, env=plain, cwd=tmp_path))
    for name in names:
        log = (out / "logs" / f"{name}.log").read_text()
        assert "--resume" in [p for p in log.split("==== ") if " train: " in p][-1].splitlines()[0]
        assert json.loads((out / name / "run.json").read_text())["global_step"] == 2000


# ---- bad input: one line, exit code 2, nothing written --------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--jobs", "0"], "--jobs must be at least 1, got 0"),
        (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --executor ray"),
        (["--executor", "ray", "--jobs", "2"], "--jobs is for the local executor"),
        (["--retries", "-1"], "--retries must be 0 or more, got -1"),
        (["--gpu-memory", "lots"], "--gpu-memory"),
    ],
)
def test_bad_executor_options_are_refused_before_anything_is_written(models, data, tmp_path, args, message):
    spec = write_grid(tmp_path / "g.yaml", models, data)
    with pytest.raises(FtctlError, match="^" + re.escape(message)) as caught:
        grid.main([str(spec), "--output-dir", str(tmp_path / "grid"), *args])
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    assert not (tmp_path / "grid").exists()


def test_an_unreachable_ray_address_is_refused_in_seconds(models, data, tmp_path):
    pytest.importorskip("ray", reason="Ray is installed with ftctl's dev extras (CI installs them)")
    spec = write_grid(tmp_path / "g.yaml", models, data)
    port = free_port()
    started = time.time()
    with pytest.raises(FtctlError) as caught:
        grid.main([str(spec), "--output-dir", str(tmp_path / "grid"), "--executor", "ray", "--ray-address",
                   f"127.0.0.1:{port}"])  # fmt: skip
    message = str(caught.value)
    assert message.startswith(f"--ray-address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"), message
    assert "ray start --head" in message and caught.value.exit_code == 2 and time.time() - started < 60
    assert not (tmp_path / "grid").exists()


def test_without_ray_the_ray_executor_says_how_to_install_it(models, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does where Ray is not installed
    spec = write_grid(tmp_path / "g.yaml", models, data)
    with pytest.raises(FtctlError, match=r"--executor ray needs Ray.*pip install 'ftctl\[ray\]'"):
        grid.main([str(spec), "--output-dir", str(tmp_path / "grid"), "--executor", "ray"])
    assert not (tmp_path / "grid").exists()


@pytest.mark.slow  # plans the cell, then re-plans it under each change that might make it fit
def test_a_cell_over_gpu_memory_stops_the_grid_with_what_would_fit(models, data, tmp_path):
    spec = write_grid(tmp_path / "g.yaml", models, data, seeds=[1], methods=["lora"])
    with pytest.raises(FtctlError) as caught:
        grid.main([str(spec), "--output-dir", str(tmp_path / "grid"), "--gpu-memory", "300MiB"])
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    assert message.startswith("cell tinybert__sst2__lora__seed1 needs ") and "more than --gpu-memory 0.3 GiB" in message
    assert "no single-GPU setting fits" in message or "fits with" in message
    assert not (tmp_path / "grid").exists()


# ---- packing ----------------------------------------------------------------------------------------------------
def test_cells_are_packed_onto_gpus_by_process_count_and_predicted_memory():
    eight = [(str(i), 81920.0) for i in range(8)]
    machine = Machine(8, gpus=eight)
    # no prediction: a GPU per process. A 4-process cell and four 1-GPU cells fill the machine; a sixth waits
    big = machine.place(Need(4))
    small = [machine.place(Need(1)) for _ in range(4)]
    assert big is not None and len(big.gpus) == 4 and all(s is not None and len(s.gpus) == 1 for s in small)
    assert sorted(g for s in [big, *small] for g in s.gpus) == list(range(8))
    assert machine.place(Need(1)) is None
    machine.release(big)
    assert machine.place(Need(2)) is not None

    # predicted memory: small cells share a GPU while their needs fit it, fullest GPU first (best fit)
    machine = Machine(8, gpus=[("0", 24576.0), ("1", 24576.0)])
    first, second = machine.place(Need(1, 10000.0)), machine.place(Need(1, 10000.0))
    assert first.gpus == second.gpus == (0,)
    third = machine.place(Need(1, 10000.0))
    assert third.gpus == (1,)
    assert machine.place(Need(2, 20000.0)) is None  # neither GPU has 20 GB left
    machine.release(first)
    machine.release(second)
    assert machine.place(Need(1, 20000.0)).gpus == (0,)
    env = third.environment(["3", "5"], split=True)
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and env["OMP_NUM_THREADS"] == str(third.threads)

    # --gpu-memory caps what a cell may plan on; a cell that can never fit is refused before anything runs
    capped = Machine(2, gpu_memory_mb=16384.0, gpus=[("0", 81920.0)])
    with pytest.raises(FtctlError, match="needs 2 GPUs .* this machine has 1"):
        capped.check("c", Need(2))
    with pytest.raises(FtctlError, match="needs 19.5 GiB per GPU and the largest GPU here has 16.0 GiB"):
        capped.check("c", Need(1, 20000.0))
    with pytest.raises(FtctlError, match="--jobs must be at least 1"):
        Machine(0, gpus=[])


def test_cpu_cells_split_the_cores_and_wait_for_memory():
    machine = Machine(2, gpus=[])
    machine.cores, machine.host_mb = 8, 1000.0
    a = machine.place(Need(2, 300.0))
    assert a is not None and a.threads == 2 and a.gpus == ()  # 8 cores, 2 cells, 2 processes each
    assert machine.place(Need(1, 600.0)) is None  # 600 + 600 MB predicted would not fit the memory left
    b = machine.place(Need(1, 300.0))
    assert b is not None and b.threads == 4
    assert machine.place(Need(1, 1.0)) is None  # two cells run: --jobs 2
    machine.release(a)
    assert machine.place(Need(1, 300.0)) is not None


# ---- a Ray node that does not share the grid directory -----------------------------------------------------------
def ray_node(*args: str, env: dict[str, str], isolate: Path | None = None) -> subprocess.Popen:
    """`ray start ... --block` in a session of its own; with `isolate`, in a mount namespace of its own where an
    empty tmpfs hides that directory (a node whose filesystem is not the head's)."""
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "start", *args, "--num-cpus=1", "--disable-usage-stats", "--block"]
    if isolate is not None:
        inner = f"mount -t tmpfs none {isolate} && exec " + " ".join(cmd)
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", inner]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.slow
def test_a_ray_node_that_does_not_see_the_grid_directory_stops_the_grid(models, data, tmp_path):
    pytest.importorskip("ray", reason="Ray is installed with ftctl's dev extras (CI installs them)")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode:  # pragma: no cover - CI runs as root; elsewhere mount namespaces may be refused
        pytest.skip(f"unshare -m is not permitted here: {probe.stderr.decode().strip()}")
    spec = write_grid(tmp_path / "g.yaml", models, data)
    out = tmp_path / "grid"
    out.mkdir()
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's sockets live here: a short path
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    head = ray_node("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", env=env)
    nodes = [head]
    try:
        import ray

        deadline = time.time() + 120
        while True:  # the head answers, then the second node joins
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "the Ray head did not start"
                time.sleep(0.5)
        nodes.append(ray_node(f"--address=127.0.0.1:{port}", env=env, isolate=out))
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        try:
            while len([n for n in ray.nodes() if n["Alive"]]) < 2:
                assert time.time() < deadline, "the second Ray node did not join"
                time.sleep(0.5)
        finally:
            ray.shutdown()
        result = subprocess.run(
            [str(Path(sys.executable).parent / "ftctl"), "grid", str(spec), "--output-dir", str(out),
             "--executor", "ray", "--ray-address", f"127.0.0.1:{port}"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert line.startswith(f"error: the grid directory {out} is not shared with Ray node ")
    assert "put it on a filesystem all nodes mount" in line
    assert list(out.iterdir()) == []  # nothing written: the probe file is gone


def test_a_worker_killed_under_accelerate_counts_as_killed():
    """A cell through `accelerate launch` exits 1 when a signal ends one of its workers; torch's elastic launcher
    says so in the cell's log, in the words of its own ProcessFailure."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    report = ProcessFailure(local_rank=1, pid=4242, exitcode=-9, error_file="/nonexistent").message
    assert killed(1, f"ChildFailedError:\n  traceback : {report}\n")
    assert killed(-9) and not killed(1, "ValueError: bad label") and not killed(0) and not killed(None)
