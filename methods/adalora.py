"""AdaLoRA: LoRA whose rank budget is reallocated during training (Zhang et al. 2023, arXiv:2303.10512), through PEFT.

Each adapted layer starts at `--adalora-init-r` (SVD-form updates P diag(E) Q); after `tinit` warm-up steps the
least important singular values are pruned every `delta_t` steps until the average rank reaches `--lora-r` at
`total_step - tfinal`, then the ranks stay fixed. The pruning reads the gradients, so it must run after every
optimizer step and before the gradients are cleared: a Trainer callback on `on_optimizer_step` calls PEFT's
`update_and_allocate`. Without that call AdaLoRA silently trains a plain LoRA of rank init_r; run.json records the
final ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ftctl.errors import FtctlError
from ftctl.options import option
from ftctl.vocab import TaskKind
from methods._matrix import Refusal
from methods.base import Context, PeftMethod, register_method
from methods.lora import ALL_LINEAR, DEFAULT_ALPHA, LoraOptions, resolve_targets
from tasks.base import Task

if TYPE_CHECKING:  # annotations only
    import torch
    from transformers import PreTrainedTokenizerBase, TrainerControl, TrainerState, TrainingArguments


@dataclass
class AdaLoraOptions(LoraOptions):
    adalora_init_r: int = option(12, "starting rank of every adapted layer (pruned down to --lora-r on average)")
    adalora_tinit: int | None = option(None, "steps before rank pruning starts (default: a tenth of the steps)")
    adalora_tfinal: int | None = option(None, "last steps trained at the final ranks (default: a fifth of the steps)")
    adalora_delta_t: int | None = option(
        None, "steps between two rank reallocations (default: a hundredth of the steps, at least 1)"
    )

    def validate(self) -> None:
        super().validate()
        if self.adalora_init_r < self.lora_r:
            raise FtctlError(
                f"--adalora-init-r ({self.adalora_init_r}) must be at least the target rank --lora-r ({self.lora_r})"
            )
        for name in ("adalora_tinit", "adalora_tfinal"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise FtctlError(f"--{name.replace('_', '-')} must not be negative, got {value}")
        if self.adalora_delta_t is not None and self.adalora_delta_t < 1:
            raise FtctlError(f"--adalora-delta-t must be at least 1, got {self.adalora_delta_t}")


def schedule(opts: AdaLoraOptions, total: int) -> dict[str, int]:
    """PEFT's budget schedule for `total` optimizer steps, refused when it leaves no pruning phase."""
    tinit = opts.adalora_tinit if opts.adalora_tinit is not None else total // 10
    tfinal = opts.adalora_tfinal if opts.adalora_tfinal is not None else total // 5
    delta_t = opts.adalora_delta_t or max(1, total // 100)
    if total - tfinal - tinit <= 0:
        raise FtctlError(
            f"adalora: {total} optimizer steps leave no rank-pruning phase after --adalora-tinit {tinit} and before "
            f"the last --adalora-tfinal {tfinal}; train longer or lower them"
        )
    return {"total_step": total, "tinit": tinit, "tfinal": tfinal, "deltaT": delta_t}


def rank_allocation(model: torch.nn.Module) -> Any:
    """A Trainer callback running AdaLoRA's budget schedule after every optimizer step, while the gradients are
    still there (defined here so that importing the method registry does not import transformers)."""

    class RankAllocation(TrainerCallback):
        def on_optimizer_step(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
        ) -> None:
            # the Trainer calls this after optimizer.step() and before zero_grad(); global_step is still the index of
            # the step just taken, which is what PEFT's schedule counts
            model.base_model.update_and_allocate(state.global_step)

    return RankAllocation()


@register_method
class AdaLora(PeftMethod):
    name = "adalora"
    description = "LoRA with adaptive rank allocation (AdaLoRA): ranks pruned by importance during training"
    trains = "SVD-form low-rank adapters + head"
    Options = AdaLoraOptions
    mergeable = True
    # Every linear layer of the blocks, as in the AdaLoRA paper (it adapts all weight matrices, the budget decides
    # where rank goes). SST-2 with MiniLM (2,000 sentences, 5 epochs, all of dev.tsv): on LoRA's query/value targets
    # AdaLoRA stayed at 0.799-0.804 for lr 1e-3 to 3e-3; on every linear layer it reached 0.820 at 1e-3, 0.825 at 2e-3.
    defaults = {
        "*": {"learning_rate": 5e-4, "target_modules": [ALL_LINEAR]},
        TaskKind.CLASSIFICATION: {"learning_rate": 2e-3, "epochs": 5.0},
        TaskKind.REGRESSION: {"learning_rate": 3e-4},
        TaskKind.TOKENS: {"learning_rate": 1e-3},
    }
    refusals = (
        Refusal(
            "DeepSpeed",
            lambda cell: cell.launch.deepspeed,
            "method '{method}' reallocates ranks from the gradients after each optimizer step, and DeepSpeed's "
            "engine clears them inside its own step; use DDP (no --deepspeed) or lora",
            static=False,
        ),
    )

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model: torch.nn.Module = None
        self.plan: dict[str, int] = {}

    def plain_loss_reason(self) -> str | None:
        return "AdaLoRA adds its orthogonality penalty to the model's own loss"

    def peft_config(self, model: torch.nn.Module, task: Task, ctx: Context) -> Any:
        from peft import AdaLoraConfig  # deferred: a heavy import (seconds), paid only by the runs that use it

        if ctx.data is None:
            raise RuntimeError("adalora's rank schedule needs the number of training steps (Context.data)")
        self.plan = schedule(self.opts, ctx.data.total_steps)
        return AdaLoraConfig(
            task_type=task.fit.peft_task_type,
            init_r=self.opts.adalora_init_r,
            target_r=self.opts.lora_r,
            lora_alpha=self.opts.lora_alpha or DEFAULT_ALPHA,
            lora_dropout=self.opts.lora_dropout,
            target_modules=resolve_targets(model, ctx.model_config.model_type, self.opts.target_modules),
            bias=self.opts.lora_bias,
            modules_to_save=task.head_modules(model) or None,
            **self.plan,
        )

    def apply(self, model: torch.nn.Module, task: Task, ctx: Context) -> torch.nn.Module:
        self.model = self.wrap(model, self.peft_config(model, task, ctx), ctx)
        return self.model

    def load_trained(
        self, task: Task, path: str, base: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]
    ) -> Any:
        model = super().load_trained(task, path, base, tokenizer, load_kwargs)
        # PEFT's AdaLoRA adds its orthogonality penalty to any loss its forward returns, reading the adapter's name
        # from an attribute that only a trainable model has; a loaded one would fail on the first scored batch
        model.base_model.trainable_adapter_name = model.active_adapter
        return model

    def callbacks(self) -> list[Any]:
        return [rank_allocation(self.model)]

    def record(self, model: torch.nn.Module) -> dict[str, Any]:
        return {
            "adalora": {
                "init_r": self.opts.adalora_init_r,
                "target_r": self.opts.lora_r,
                **self.plan,
                "final_ranks": final_ranks(model),
            }
        }


def final_ranks(model: torch.nn.Module) -> dict[str, int]:
    """Adapted layer (layer indices kept) -> rank left after pruning (the non-zero singular values)."""
    # deferred: a heavy import (seconds), paid only by the runs that use it
    from peft.tuners.adalora import AdaLoraLayer

    ranks = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaLoraLayer) and "default" in module.lora_E:
            ranks[name.removeprefix("base_model.model.")] = int((module.lora_E["default"] != 0).sum())
    return ranks
