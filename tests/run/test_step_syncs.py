"""The training step waits for the device at most once per logging interval (issue: no host syncs in the hot loop).

Every tensor-to-host conversion (`item`, `tolist`, `bool`, `int`, `float`, `index`) made directly by ftctl's code
while the Trainer trains is counted; the Trainer's own per-step reads that ftctl switches off (its NaN filter, its
cross-process token count) are switched off. On a GPU the same is checked with torch.cuda.set_sync_debug_mode
(bench/gpu.py)."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from conftest import REPO

CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
OURS = tuple(str(REPO / package) for package in ("launch", "tasks", "methods", "ftctl"))


TRAINER = "transformers/trainer.py"


def device_reads(train, monkeypatch, name: str) -> list[tuple[str, str, int]]:
    """Every tensor-to-host conversion made while the Trainer trains 12 steps, logging every 4th: (conversion,
    calling file, line), for calls made directly by ftctl's code or by the Trainer's own loop."""
    from launch.run.trainer import FtctlTrainer

    seen: list[tuple[str, str, int]] = []
    training = {"on": False}

    def counted(conversion: str, original):
        def wrapper(self, *args, **kwargs):
            if training["on"]:
                caller = sys._getframe(1)
                where = caller.f_code.co_filename
                if where.startswith(OURS) or where.endswith(TRAINER):
                    seen.append((conversion, where, caller.f_lineno))
            return original(self, *args, **kwargs)

        return wrapper

    for conversion in CONVERSIONS:
        monkeypatch.setattr(torch.Tensor, conversion, counted(conversion, getattr(torch.Tensor, conversion)))
    original_loop = FtctlTrainer._inner_training_loop

    def loop(self, *args, **kwargs):
        training["on"] = True
        try:
            return original_loop(self, *args, **kwargs)
        finally:
            training["on"] = False

    monkeypatch.setattr(FtctlTrainer, "_inner_training_loop", loop)
    out = train("--max-steps", "12", "--logging-steps", "4", "--eval-strategy", "no", "--save-strategy", "no",
                "--no-eval-on-start", "--no-load-best-model-at-end", name=name)  # fmt: skip
    assert (out / "run.json").is_file()
    return seen


def test_at_most_one_device_read_per_logging_interval(train, monkeypatch):
    seen = [read for read in device_reads(train, monkeypatch, "syncs") if read[1].startswith(OURS)]
    assert len(seen) <= 12 // 4, seen
    assert seen, "the health check reads the device at the logging steps (the count must be able to see reads)"


def test_the_trainer_is_told_not_to_read_per_step(train, monkeypatch):
    """The Trainer's NaN filter (`torch.isnan(loss) or ...`, a read at every micro-step) and its cross-process token
    count are off: the Trainer's own loop reads the device at the logging steps only, not at each of the 12 steps
    (with `logging_nan_inf_filter=True` it reads at every one)."""
    lines = Counter(
        line for _, where, line in device_reads(train, monkeypatch, "trainer-reads") if where.endswith(TRAINER)
    )
    assert lines, "the Trainer reads the logged loss: the count must be able to see its reads"
    # at most once per logging event (steps 1, 4, 8, 12: the loss and the grad norm), never at each of the 12 steps
    assert max(lines.values()) <= 12 // 4 + 1, lines


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
