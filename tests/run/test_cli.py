"""The entry points as a user runs them (subprocesses): `ftctl`, `python -m launch.train`, `accelerate launch -m
launch.train`, `python -m launch.evaluate`. They take the same options and give the same results."""

from __future__ import annotations

import json

import pytest
from conftest import cli, data_args, run_json


def test_help_and_list_are_complete(monkeypatch):
    """`ftctl --help` names every verb; `ftctl list` every registered task preset, method and task metric (the
    start-up time of `ftctl --help` is measured in the closing notes and bench, not here)."""
    from methods import METHODS
    from tasks import TASKS

    result = cli("ftctl", "--help")
    assert result.returncode == 0
    assert all(verb in result.stdout for verb in ("train", "evaluate", "merge", "grid", "report", "list"))
    monkeypatch.setenv("COLUMNS", "400")  # one line per row: names are not folded
    result = cli("ftctl", "list")
    assert result.returncode == 0
    metrics = {m for _, spec in TASKS.items() for m in spec.cls.metrics}
    for name in (*TASKS, *METHODS, *metrics):
        assert name in result.stdout, name
    result = cli("ftctl", "train", "--help")
    assert result.returncode == 0 and "--learning-rate" in result.stdout and "--lora-r" in result.stdout
    result = cli("ftctl", "evaluate", "--help")
    assert result.returncode == 0 and "--baseline" in result.stdout


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["ftctl", "train", "--task", "nope"], "unknown task 'nope'"),
        (["python", "-m", "launch.train", "--task", "sst2", "--model", "/no/such/dir"], "model path not found"),
        (["ftctl", "evaluate", "/no/such/run"], "run directory not found"),
    ],
)
def test_errors_are_one_line_exit_2(argv, fragment):
    result = cli(*argv)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_all_entry_points_run_the_same_code(models, data, tmp_path):
    common = [
        "--task",
        "sst2",
        "--method",
        "lora",
        "--model",
        str(models["bert"]),
        *data_args(data),
        "--max-steps",
        "6",
        "--batch-size",
        "8",
        "--eval-strategy",
        "no",
        "--save-strategy",
        "no",
        "--report-to",
        "none",
    ]
    runs = {
        "ftctl": ("ftctl", "train"),
        "module": ("python", "-m", "launch.train"),
        "accelerate": (
            "accelerate",
            "launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "launch.train",
        ),
    }
    metrics = {}
    for name, prefix in runs.items():
        out = tmp_path / name
        result = cli(*prefix, *common, "--output-dir", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        metrics[name] = run_json(out)["metrics"]
    assert metrics["ftctl"] == metrics["module"] == metrics["accelerate"]

    scored = {}
    for name, prefix in {"ftctl": ("ftctl", "evaluate"), "module": ("python", "-m", "launch.evaluate")}.items():
        output = tmp_path / f"{name}.json"
        result = cli(*prefix, str(tmp_path / "ftctl"), "--output", str(output))
        assert result.returncode == 0, result.stderr[-3000:]
        scored[name] = json.loads(output.read_text())
    assert scored["ftctl"]["accuracy"] == scored["module"]["accuracy"]
    scored["ftctl"]["details"].pop("speed"), scored["module"]["details"].pop("speed")
    assert scored["ftctl"]["details"] == scored["module"]["details"]


@pytest.mark.distributed
def test_a_users_tasks_folder_never_shadows_ftctls(models, data, tmp_path):
    """A folder named `tasks/` where the user runs ftctl: `python -m launch.train` (which puts the current directory
    first on the path) stops with one line naming it; the processes ftctl starts itself never look there."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("raise ImportError('the user\\'s own tasks package')\n")
    result = cli("python", "-m", "launch.train", "--task", "sst2", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "shadows ftctl's package 'tasks'" in lines[0], result.stderr
    out = tmp_path / "run"
    common = ["--task", "sst2", "--model", str(models["bert"]), *data_args(data), "--max-steps", "2",
              "--report-to", "none", "--output-dir", str(out)]  # fmt: skip
    result = cli("ftctl", "train", "--num-processes", "2", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["launch"]["num_processes"] == 2
