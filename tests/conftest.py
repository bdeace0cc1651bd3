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
