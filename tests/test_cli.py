"""The entry points as a user runs them (subprocesses): `ftctl`, `python -m launch.train`, `accelerate launch -m
launch.train`, `python -m launch.evaluate`. They take the same options and give the same results."""

from __future__ import annotations

import json

import pytest
from conftest import cli, data_args, run_json


def test_help_and_list_are_fast_and_complete():
    result = cli("ftctl", "--help")
    assert result.returncode == 0 and "train" in result.stdout and "evaluate" in result.stdout
    result = cli("ftctl", "list")
    assert result.returncode == 0
    for name in (
        "sst2",
        "imdb",
        "emotion",
        "amazon_polarity",
        "classification",
        "full",
        "lora",
        "head",
        "freeze",
        "accuracy",
    ):
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
