"""Every use of a private method of the transformers Trainer, in one marked place: the four it overrides and the two
it calls.

Private methods change without notice between transformers releases (ftctl pins transformers below 5.24 for that
reason); tests/run/test_trainer_internals.py compares `PRIVATE` with the installed Trainer's signatures and fails
when one differs, so an upgrade names what to look at instead of breaking a run midway.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import TrainOutput

from launch.run import rundir
from launch.run.reliability import EpochSeededLengthGroupedSampler, write_checkpoint_atomically

TIME_FILE = "ftctl_time.json"  # in each checkpoint: the run's training seconds so far (every session)

# name -> the parameters ftctl's code relies on (overridden: the Trainer calls ours with them; called: we call its)
PRIVATE: dict[str, tuple[str, ...]] = {
    "_get_output_dir": ("self", "trial"),  # overridden: checkpoints are staged, then promoted atomically
    "_save_checkpoint": ("self", "model", "trial"),  # overridden: the same, with the run spec and training time
    "_get_train_sampler": ("self", "train_dataset"),  # overridden: length groups of the global batch
    "_get_eval_sampler": ("self", "eval_dataset"),  # overridden: evaluation keeps the dataset's order
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),  # called: a finished run's last weights
    "_prepare_inputs": ("self", "inputs"),  # called: generation prompts onto the device as the Trainer moves batches
    "_determine_best_metric": ("self", "metrics", "trial"),  # overridden: a tie goes to the lower validation loss
}


def eval_loss_at(history: list[dict[str, Any]], step: int | None) -> float | None:
    """The validation loss logged at `step` (the last evaluation there), or None."""
    found = [h["eval_loss"] for h in history if h.get("step") == step and isinstance(h.get("eval_loss"), (int, float))]
    return float(found[-1]) if found else None


def ties(value: float, best: float) -> bool:
    """Two scores of the primary metric that count as a tie."""
    return abs(value - best) <= 1e-12


def wins_tie(value: float, best: float | None, loss: float | None, best_loss: float | None) -> bool:
    """An evaluation that equals the best primary metric so far replaces it when its validation loss is no higher:
    the lower loss wins, and on equal loss the later step (the Trainer alone keeps the earliest of a tie)."""
    if best is None or loss is None or not ties(value, best):
        return False
    return best_loss is None or loss <= best_loss


def earlier_training(checkpoint: Path) -> float:
    """The training seconds a checkpoint's run had spent when it was written (0 for checkpoints without them)."""
    try:
        return float(json.loads((checkpoint / TIME_FILE).read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


class TrainerInternals(Trainer):
    """The Trainer with ftctl's overrides of its private methods (reliability: launch/run/reliability.py)."""

    _checkpoint_root: str | None = None

    def training_seconds(self) -> float:  # FtctlTrainer's clock
        raise NotImplementedError

    def _get_output_dir(self, trial: Any) -> str:
        return self._checkpoint_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        run_dir = self._get_output_dir(trial)

        def save_into(root: str) -> None:
            self._checkpoint_root = root
            try:
                super(TrainerInternals, self)._save_checkpoint(model, trial)
                if self.args.should_save:  # in the staged checkpoint: promoted with it, atomically
                    checkpoint = Path(root) / f"checkpoint-{self.state.global_step}"
                    rundir.write_json(checkpoint / TIME_FILE, {"train_seconds": self.training_seconds()})
                    spec = Path(run_dir) / rundir.SPEC_FILE  # a checkpoint alone can be evaluated or resumed
                    if spec.is_file():
                        shutil.copy2(spec, checkpoint / rundir.SPEC_FILE)
            finally:
                self._checkpoint_root = None

        write_checkpoint_atomically(self, save_into, run_dir)

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        best_before, step_before = self.state.best_metric, self.state.best_global_step
        if super()._determine_best_metric(metrics, trial):
            return True
        name = self.args.metric_for_best_model or "loss"
        value = metrics.get(name if name.startswith("eval_") else f"eval_{name}")
        best_loss = eval_loss_at(self.state.log_history, step_before)
        if value is None or not wins_tie(float(value), best_before, metrics.get("eval_loss"), best_loss):
            return False
        self.state.best_global_step = self.state.global_step
        return True

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            # Group by the global batch, not the per-process one: then the processes split exactly the batches one
            # process would see, and results do not depend on the number of processes.
            args = self.args
            global_batch = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
            return EpochSeededLengthGroupedSampler(global_batch, sampler.lengths, args.data_seed or 0)
        return sampler

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        # The stock sampler shuffles evaluation data when training groups by length; we sort evaluation sets by
        # length ourselves (same padding saving) and need predictions back in that order.
        if self.args.world_size <= 1:
            return torch.utils.data.SequentialSampler(eval_dataset)
        return None

    def finished_at(self, checkpoint: Path) -> TrainOutput | None:
        """A checkpoint written when training had already taken all its `--max-steps` (the run stopped later, while
        scoring or saving): its weights and state, and no step more. The stock loop, resumed there in the middle of
        an epoch, would take one step past max_steps before it looks."""
        state_file = checkpoint / TRAINER_STATE_NAME
        if self.args.max_steps <= 0 or not state_file.is_file():
            return None
        state = TrainerState.load_from_json(str(state_file))
        if state.global_step < self.args.max_steps:
            return None
        self._load_from_checkpoint(str(checkpoint))
        self.state = state
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        return TrainOutput(state.global_step, losses[-1] if losses else 0.0, {"train_runtime": 0.0})
