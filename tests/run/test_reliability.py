"""No lost work: resume after SIGKILL gives the same weights, SIGTERM checkpoints and says how to resume,
checkpoints are atomic, a diverging loss stops the run, incompatible resumes and unsafe weights are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, data_args, run_json
from safetensors.torch import load_file

from ftctl.errors import FtctlError, run_main


def command(models, data, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.train",
        "--task",
        "sst2",
        "--method",
        "lora",
        "--model",
        str(models["gpt2"]),
        *data_args(data),
        "--output-dir",
        str(out),
        "--batch-size",
        "8",
        "--learning-rate",
        "5e-3",
        "--eval-strategy",
        "no",
        "--report-to",
        "none",
        "--logging-steps",
        "1",
        *extra,
    ]


def popen(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def test_resume_after_sigkill_ends_with_the_same_weights(models, data, tmp_path):
    steps = ["--max-steps", "60", "--save-every", "10", "--keep-last", "10"]
    reference = tmp_path / "reference"
    done = subprocess.run(
        command(models, data, reference, *steps),
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = popen(command(models, data, killed, *steps))
    wait_for(killed / "checkpoint-20" / "spec.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "run.json").exists(), "the run was meant to die before finishing"
    newest = max(killed.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    earlier = json.loads((newest / "ftctl_time.json").read_text())["train_seconds"]  # written with the checkpoint
    resumed = subprocess.run(
        command(models, data, killed, *steps, "--resume"),
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Same data order (epoch-seeded sampler), restored optimizer/scheduler/RNG: bitwise equal on CPU.
    expected, got = weights(reference), weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert run_json(killed)["metrics"] == run_json(reference)["metrics"]
    # the cost counts every session: the killed one's training up to its checkpoint, then the resumed one's
    record = run_json(killed)
    assert 0 < earlier and record["train_runtime_total_s"] == pytest.approx(earlier + record["train_runtime_s"])
    assert record["device_hours"] == pytest.approx(record["train_runtime_total_s"] / 3600)
    assert run_json(reference)["train_runtime_total_s"] == run_json(reference)["train_runtime_s"]


def test_resume_from_the_final_checkpoint_takes_no_step_more(models, data, tmp_path):
    """A run stopped after its last step (while scoring or saving) resumes from its final checkpoint to the same
    weights, without training past --max-steps (30 steps: mid-epoch, 24 batches an epoch)."""
    steps = ["--max-steps", "30", "--save-every", "10", "--keep-last", "10"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = tmp_path / "reference"
    done = subprocess.run(command(models, data, reference, *steps), cwd=REPO, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    stopped = tmp_path / "stopped"  # what a run killed after its last checkpoint leaves: no run.json
    stopped.mkdir()
    shutil.copy2(reference / "spec.json", stopped / "spec.json")
    shutil.copytree(reference / "checkpoint-30", stopped / "checkpoint-30")
    resumed = subprocess.run(
        command(models, data, stopped, *steps, "--resume"), cwd=REPO, capture_output=True, text=True, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert run_json(stopped)["global_step"] == 30 and not (stopped / "checkpoint-31").exists()
    expected, got = weights(reference), weights(stopped)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert run_json(stopped)["metrics"] == run_json(reference)["metrics"]


def test_sigterm_checkpoints_and_says_how_to_resume(models, data, tmp_path):
    out = tmp_path / "run"
    proc = popen(command(models, data, out, "--max-steps", "100000", "--save-strategy", "no"))
    deadline = time.time() + 240
    while "step 5/" not in (line := proc.stdout.readline()):
        assert line or proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    message = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert len(message) == 1 and "SIGTERM received" in message[0] and "--resume" in message[0], stderr[-2000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter_model.safetensors").is_file()
    assert (checkpoints[0] / "spec.json").is_file() and not (out / "run.json").exists()
    step = int(checkpoints[0].name.split("-")[1])
    assert step >= 5
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["global_step"] == step


def test_checkpoint_killed_midway_leaves_nothing_that_looks_complete(train, monkeypatch, tmp_path, capsys):
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    from launch.evaluate import main as evaluate

    original = Trainer._save_optimizer_and_scheduler
    calls = {"n": 0}

    def crash_on_second_save(self, output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (injected)")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash_on_second_save)
    with pytest.raises(OSError, match="injected"):
        train("--save-every", "12", "--max-steps", "40", "--no-eval-on-start", name="crash")
    out = tmp_path / "crash"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12"]
    assert get_last_checkpoint(str(out)).endswith("checkpoint-12")
    assert run_main(evaluate, [str(out)]) == 2
    assert "did not finish" in capsys.readouterr().err

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)
    train("--save-every", "12", "--max-steps", "40", "--no-eval-on-start", "--resume", name="crash")
    assert run_json(out)["global_step"] == 40


def test_a_checkpoint_appears_whole_with_its_spec_and_training_time(train, monkeypatch, tmp_path):
    """A checkpoint is promoted from staging with everything resuming needs already inside: a process killed right
    after the rename leaves no checkpoint without its run spec (which --resume would refuse)."""
    from launch.run import reliability

    promoted = []
    original = reliability._promote

    def watched(source: str, target: str, staging: str) -> None:
        promoted.append(sorted(p.name for p in Path(source).iterdir()))
        original(source, target, staging)

    monkeypatch.setattr(reliability, "_promote", watched)
    train("--save-every", "10", "--max-steps", "20", "--no-eval-on-start", name="whole")
    assert len(promoted) == 2
    for names in promoted:
        assert "spec.json" in names and "ftctl_time.json" in names and "trainer_state.json" in names, names


def test_training_diverged_stops_with_the_step_and_last_checkpoint(train, monkeypatch, tmp_path):
    from launch.run.reliability import TrainingDiverged
    from launch.run.trainer import FtctlTrainer

    original = FtctlTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step >= 13:
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(FtctlTrainer, "compute_loss", poisoned)
    # seen at the next checked step (16: logging every 4), before the checkpoint of step 18 would be written
    with pytest.raises(TrainingDiverged, match=r"became non-finite .* at step 14;.*last good one: .*checkpoint-12"):
        train("--save-every", "6", "--max-steps", "40", "--no-eval-on-start", name="nan")
    out = tmp_path / "nan"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12"]  # none after the divergence
    assert not (out / "run.json").exists()


def test_resume_refuses_a_checkpoint_of_another_run(train, models, data, tmp_path, capsys):
    from launch.train import main

    run_dir = train("--save-every", "6", "--max-steps", "12", "--no-eval-on-start")
    checkpoint = sorted(run_dir.glob("checkpoint-*"))[-1]
    base = ["--task", "sst2", "--model", str(models["bert"]), *data_args(data), "--report-to", "none"]
    code = run_main(
        main, [*base, "--method", "full", "--resume-from", str(checkpoint), "--output-dir", str(tmp_path / "other")]
    )
    assert code == 2 and "trained with method='lora'" in capsys.readouterr().err
    (run_dir / "run.json").unlink()  # an interrupted run (a finished one is never resumed at all)
    code = run_main(main, [*base, "--method", "lora", "--lora-r", "4", "--output-dir", str(run_dir), "--resume"])
    assert code == 2 and "trained with lora_r=8" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_pickle_weights_need_an_explicit_flag(models, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch.train import setup

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"])
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the pre-safetensors checkpoint format
    AutoTokenizer.from_pretrained(models["gpt2"]).save_pretrained(pickled)
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    argv = ["--task", "sst2", "--model", str(pickled), *data_args(data), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(FtctlError, match="only pickle \\(.bin\\) weights"):
        setup(argv)
    assert setup([*argv, "--allow-pickle-weights"]).model is not None


def test_fp16_on_t5_is_refused(models, data, tmp_path):
    from launch.train import setup

    with pytest.raises(FtctlError, match="fp16 overflows to NaN in t5"):
        setup(
            [
                "--task",
                "sst2",
                "--model",
                str(models["t5"]),
                *data_args(data),
                "--precision",
                "fp16",
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )


def test_resume_on_a_finished_run_is_refused_and_changes_nothing(train, tmp_path):
    out = train("--max-steps", "4", "--no-eval-on-start", name="done")
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FtctlError, match="already finished .* never rewritten"):
        train("--max-steps", "4", "--no-eval-on-start", "--resume", name="done")
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_resume_skips_a_damaged_newest_checkpoint(train, tmp_path, capsys):
    out = train("--save-every", "6", "--max-steps", "12", "--keep-last", "3", "--no-eval-on-start", name="damaged")
    (out / "run.json").unlink()  # as if the process had died after its last checkpoint
    newest = out / "checkpoint-12"
    weights = next(newest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated mid-write
    capsys.readouterr()
    steps = ("--save-every", "6", "--max-steps", "12", "--keep-last", "3", "--no-eval-on-start")
    train(*steps, "--resume", name="damaged")
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "checkpoint-12" in captured.err and "checkpoint-6" in captured.err
    assert "resuming from" in captured.out, captured.out
    assert run_json(out)["global_step"] == 12
