"""Keeping work safe: graceful stop on SIGTERM/SIGINT, non-finite loss detection, reproducible resumable batching,
and checkpoints written under a temporary name then renamed.

Every decision that stops training is agreed by all processes (one tiny all-reduce per step when distributed), so
one process never waits forever in a collective that the others left.
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
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
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


def agree(flag: bool, args: Any) -> bool:
    """True on every process if it is true on any (a no-op for a single process)."""
    if args.world_size <= 1 or not torch.distributed.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=args.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current optimizer step, write a checkpoint, stop. A second SIGINT
    interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

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
        if agree(self.received is not None, args):
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
