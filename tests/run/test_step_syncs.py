"""The training step waits for the device at most once per logging interval (issue: no host syncs in the hot loop).

Every tensor-to-host conversion (`item`, `tolist`, `bool`, `int`, `float`, `index`) made directly by ftctl's code
while the Trainer trains is counted; the Trainer's own per-step reads that ftctl switches off (its NaN filter, its
cross-process token count) are switched off. On a GPU the same is checked with torch.cuda.set_sync_debug_mode
(bench/gpu.py)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO

CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
OURS = tuple(str(REPO / package) for package in ("launch", "tasks", "methods", "ftctl"))


def test_at_most_one_device_read_per_logging_interval(train, monkeypatch):
    from launch.run.trainer import FtctlTrainer

    seen: list[tuple[str, str, int]] = []
    training = {"on": False}

    def counted(name: str, original):
        def wrapper(self, *args, **kwargs):
            if training["on"]:
                caller = sys._getframe(1)
                if caller.f_code.co_filename.startswith(OURS):
                    seen.append((name, caller.f_code.co_filename, caller.f_lineno))
            return original(self, *args, **kwargs)

        return wrapper

    for name in CONVERSIONS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    original_loop = FtctlTrainer._inner_training_loop

    def loop(self, *args, **kwargs):
        training["on"] = True
        try:
            return original_loop(self, *args, **kwargs)
        finally:
            training["on"] = False

    monkeypatch.setattr(FtctlTrainer, "_inner_training_loop", loop)
    out = train("--max-steps", "12", "--logging-steps", "4", "--eval-strategy", "no", "--save-strategy", "no",
                "--no-eval-on-start", "--no-load-best-model-at-end", name="syncs")  # fmt: skip
    assert (out / "run.json").is_file()
    assert len(seen) <= 12 // 4, seen
    assert seen, "the health check reads the device at the logging steps (the count must be able to see reads)"


def test_the_trainer_is_told_not_to_read_per_step(train):
    """The Trainer's NaN filter and token count read the device at every micro-step: they are off."""
    import json

    out = train("--max-steps", "2", name="args")
    args = json.loads((out / "run.json").read_text())
    assert args["train_tokens"] > 0 and args["tokens_per_second"] > 0  # ftctl's own count fills the numbers


@pytest.mark.parametrize("stop_at", [5])
def test_a_signal_still_stops_at_a_checked_step_with_a_checkpoint(train, monkeypatch, tmp_path, stop_at):
    """A stop signal is acted on at once by a single process (no agreement needed)."""
    import signal

    from launch.run.reliability import GracefulStop, RunStopped
    from launch.run.trainer import FtctlTrainer

    original = FtctlTrainer.training_step

    def step(self, *args, **kwargs):
        if self.state.global_step + 1 == stop_at:
            next(cb for cb in self.callback_handler.callbacks if isinstance(cb, GracefulStop)).received = signal.SIGTERM
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FtctlTrainer, "training_step", step)
    with pytest.raises(RunStopped, match=f"stopped after step {stop_at}"):
        train("--max-steps", "40", "--no-eval-on-start", name="stop")
    assert (tmp_path / "stop" / f"checkpoint-{stop_at}").is_dir()
