"""Keeping work safe: graceful stop on SIGTERM/SIGINT, non-finite loss detection, reproducible resumable batching,
and checkpoints written under a temporary name then renamed.

Nothing here waits for the device in the middle of the training loop. A non-finite loss and a stop signal are
watched on the device (`StepHealth`) and read once per check: at every logging step and whenever the step will be
evaluated, saved or is the last. With several processes that read is one all-reduce that all of them make at the
same steps, so every process takes the same decision and none waits in a collective that the others left.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.trainer_utils import rotate_checkpoints as rotate

from ftctl.errors import FtctlError

if TYPE_CHECKING:  # annotations only
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments


class RunStopped(FtctlError):
    """Training was stopped by a signal after writing a checkpoint; the exit code is 128 + the signal number."""

    label = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class TrainingDiverged(FtctlError):
    """The loss became NaN or infinite; no checkpoint is written from that point on."""

    exit_code = 1


class StepHealth:
    """Whether a training loss was ever non-finite, and at which optimizer step first, kept on the device: recording
    it is two device operations and no host sync. `check` reads it (one sync).

    How late a NaN is seen: at the next check, i.e. within `--logging-steps` optimizer steps, and never after the step
    is evaluated or saved (those steps are checked first). That is safe: the weights only leave the process through
    an evaluation or a checkpoint, the run stops at the check naming the first bad step, and no checkpoint is written
    after it; the steps between only cost compute."""

    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None  # optimizer step of the first non-finite loss, -1 while none

    def record(self, loss: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(loss.detach()).all()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        self.first_bad = torch.where(
            (self.first_bad < 0) & ~finite, torch.full_like(self.first_bad, step), self.first_bad
        )

    def check(self, args: TrainingArguments, stop: bool) -> tuple[int, bool]:
        """(first bad step or -1, stop requested) agreed by every process: one read, one all-reduce when there are
        several processes."""
        bad = self.first_bad if self.first_bad is not None else torch.full((), -1, dtype=torch.long, device=args.device)
        if args.world_size <= 1 or not torch.distributed.is_initialized():
            return int(bad.item()), stop
        value = torch.stack([bad.to(args.device, torch.long), torch.tensor(int(stop), device=args.device)])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        first, stopped = value.tolist()
        return int(first), bool(stopped)


def is_checked_step(args: TrainingArguments, state: TrainerState, control: TrainerControl) -> bool:
    """The steps whose end reads the step health: logging steps, and any step about to be evaluated or saved, or
    the last. The same steps on every process."""
    every = max(1, int(args.logging_steps))
    last = state.max_steps > 0 and state.global_step >= state.max_steps
    return state.global_step % every == 0 or control.should_save or control.should_evaluate or last


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current optimizer step, write a checkpoint, stop (with several processes at
    the next checked step, which all of them see; see StepHealth). A second SIGINT interrupts at once. It also stops
    a run whose loss became non-finite, naming the step, before any later checkpoint is written."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, health: StepHealth | None = None) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.health = health or StepHealth()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:

        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        alone = args.world_size <= 1
        if not (is_checked_step(args, state, control) or (alone and self.received is not None)):
            return
        bad, stop = self.health.check(args, self.received is not None)
        if bad >= 0:
            out = str(args.output_dir)
            last = get_last_checkpoint(out) if os.path.isdir(out) else None
            raise TrainingDiverged(
                f"the training loss became non-finite (NaN or infinite) at step {bad}; training stopped and no later "
                f"checkpoint was written (last good one: {last or 'none'}). Lower --learning-rate, or use "
                "--precision bf16/fp32 instead of fp16"
            )
        if stop:
            self.received = self.received or signal.SIGTERM  # another process got it: stop the same way
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped batches whose order depends only on (seed, epoch), so a resumed run sees exactly the batches
    the interrupted one would have (the stock sampler draws from the global RNG, which resume cannot replay)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


def write_checkpoint_atomically(trainer: Trainer, save_into: Callable[[str], None], run_dir: str) -> None:
    """Run the Trainer's checkpoint save into a staging folder, then rename it to `checkpoint-N`.

    The stock Trainer writes `checkpoint-N` in place; a crash mid-save would leave a directory that `--resume`
    picks as the latest checkpoint. Renaming happens on each node's main process (node-local disks). `save_into(root)`
    runs the Trainer's own save with `root` in place of the run directory."""
    staging = os.path.join(run_dir, ".checkpoint-staging")
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    save_into(staging)
    args = trainer.args
    source, target = os.path.join(staging, name), os.path.join(run_dir, name)
    # First the global main process (shared or local disk), then the main process of every other node if its own
    # disk still holds a staged checkpoint (node-local disks). Barriers keep the two from racing on a shared disk.
    trainer.accelerator.wait_for_everyone()  # every process has written its part (ZeRO shards) into staging
    if args.process_index == 0:
        _promote(source, target, staging)
    trainer.accelerator.wait_for_everyone()
    if args.local_process_index == 0 and args.process_index != 0 and os.path.isdir(source):
        _promote(source, target, staging)
    trainer.accelerator.wait_for_everyone()
    best = trainer.state.best_model_checkpoint
    if best and best.startswith(staging):
        trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
    if args.should_save:
        rotate(
            output_dir=run_dir,
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=True,
        )


def _promote(source: str, target: str, staging: str) -> None:
    if not os.path.isdir(source):
        return
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.replace(source, target)
    shutil.rmtree(staging, ignore_errors=True)
