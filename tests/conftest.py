"""Shared fixtures: tiny models per family, fixture data files, and helpers that run the real entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `--precision auto` stays fp32 on the CPU here: tests compare outputs exactly, and whether a CPU has native bf16
# (where auto would pick bf16 autocast) differs between machines; test_precision.py covers the rule and bf16 itself
os.environ["FTCTL_CPU_BF16"] = "0"
if "FTCTL_CACHE" not in os.environ:  # keep the tokenized-data cache of test runs out of the user's home
    import tempfile

    os.environ["FTCTL_CACHE"] = tempfile.mkdtemp(prefix="ftctl-test-cache-")

# Fast settings for test runs on tiny random models: enough steps to leave the initial plateau, an evaluation
# before the first step (the loss to beat), no TensorBoard.
FAST = [
    "--epochs",
    "4",
    "--batch-size",
    "8",
    "--logging-steps",
    "4",
    "--report-to",
    "none",
    "--learning-rate",
    "5e-3",
    "--save-total-limit",
    "1",
    "--eval-on-start",
    "--no-plan",  # the prediction is tested where it is the subject (tests/run/test_plan.py), not in every run
]


# The tiers (docs/contributing.md): `unit` tests never train (checked below) and run in under two minutes together
# (`pytest -m unit`); `integration` is every other default test (tiny models trained end to end); `slow` the
# multi-process and real-model ones (`make test-slow`); `gpu` the ones that need CUDA (skipped without it, run on a
# lent device by bench/gpu_device.sh). Every test has a timeout (pytest-timeout; `timeout` in pyproject.toml).
SLOW_TIMEOUT_S = 1500
# The modules of the unit tier: their default tests never train and are quick. A test of one of them that does
# train in a subprocess (a grid's cells) says so with @pytest.mark.integration; slow ones stay slow.
UNIT_MODULES = {
    "kernel/test_dependencies.py", "kernel/test_dispatch.py", "kernel/test_docs.py", "kernel/test_structure.py",
    "methods/test_adapter.py", "run/test_bad_input.py", "run/test_cache.py", "run/test_config.py",
    "run/test_console.py", "run/test_dropout.py", "run/test_trainer_internals.py", "studies/test_executors.py",
    "studies/test_grid.py", "studies/test_row_view.py", "studies/test_stats.py", "tasks/test_classification.py",
    "tasks/test_prompts.py", "tasks/test_statistics.py", "tasks/test_task_metrics.py", "tasks/test_tasks_data.py",
}  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers added here
def pytest_collection_modifyitems(config, items):
    cuda = None
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        module = item.path.relative_to(REPO / "tests").as_posix()
        if not marks & {"slow", "gpu", "integration"}:
            item.add_marker(pytest.mark.unit if module in UNIT_MODULES else pytest.mark.integration)
        if "slow" in marks and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
        if "gpu" in marks:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run on a lent device: bench/gpu_device.sh)"))


_TRAINER_TRAIN: list = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A `unit` test that trains, or whose fixtures train, fails: the tier's promise (no training) is checked.
    Patched before the test's fixtures are set up, so a module fixture that trains is caught too."""
    if item.get_closest_marker("unit") is None:
        return
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"{item.nodeid} is marked unit but trains; leave it to the integration tier")

    _TRAINER_TRAIN.append(transformers.Trainer.train)
    transformers.Trainer.train = refuse


def pytest_runtest_teardown(item, nextitem):
    if _TRAINER_TRAIN:
        import transformers

        transformers.Trainer.train = _TRAINER_TRAIN.pop()


@pytest.fixture(autouse=True)
def restore_environment():
    """Each test starts from the same environment. transformers and accelerate export RANK, LOCAL_RANK,
    MASTER_PORT, ... while setting up a run in-process, and leave them behind even when the setup is refused; a later
    test (and every subprocess it starts) would then take itself for one rank of a distributed launch."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {family: tiny.save_tiny(family, base / family) for family in tiny.FAMILIES}


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "train": tiny.write_jsonl(d / "train.jsonl", tiny.sentences(192, 2)),
        "validation": tiny.write_jsonl(d / "validation.jsonl", tiny.sentences(48, 3)),
        "test": tiny.write_jsonl(d / "test.jsonl", tiny.sentences(48, 4)),
    }


def data_args(data: dict[str, Path], test: bool = True) -> list[str]:
    args = ["--train-file", str(data["train"]), "--validation-file", str(data["validation"])]
    return args + (["--test-file", str(data["test"])] if test else [])


@pytest.fixture
def train(models, data, tmp_path):
    """Run `launch.train.main` in-process on a tiny model; returns the run directory."""

    def run(*extra: str, family: str = "bert", method: str = "lora", name: str = "run", fast: bool = True) -> Path:
        from launch.train import main

        out = tmp_path / name
        argv = [
            "--task",
            "sst2",
            "--method",
            method,
            "--model",
            str(models[family]),
            *data_args(data),
            "--output-dir",
            str(out),
            *(FAST if fast else []),
            *extra,
        ]
        main(argv)
        return out

    return run


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command from the venv's bin directory (ftctl, accelerate) or `python -m ...`."""
    bin_dir = Path(sys.executable).parent
    exe = [sys.executable, *args[1:]] if args[0] == "python" else [str(bin_dir / args[0]), *args[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(exe, capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout, env=env)


def free_port() -> int:
    """A TCP port free now: each multi-process launch of the tests gets its own (pytest workers launch at once)."""
    from launch.studies.executors import free_port as port  # the grid's own, for its multi-process cells

    return port()


def eval_losses(run_dir: Path) -> list[float]:
    return [h["eval_loss"] for h in run_json(run_dir)["history"] if "eval_loss" in h]


def assert_loss_fell(run_dir: Path) -> None:
    """The validation loss after training is below the one measured before the first step."""
    values = eval_losses(run_dir)
    assert len(values) >= 2, values
    assert values[-1] < values[0], f"validation loss did not fall: {values}"
