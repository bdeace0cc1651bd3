"""(IA)^3 through PEFT: learned vectors that rescale the attention keys and values and the feed-forward activations
(Liu et al. 2022, arXiv:2205.05638). Fewer trained parameters than LoRA, and mergeable into the weights.

Default targets per architecture are PEFT's own table (keys, values and the feed-forward output layer); for other
architectures give `--target-modules` (and `--feedforward-modules`, the feed-forward ones among them, whose input
is rescaled rather than their output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftctl.errors import FtctlError
from ftctl.options import option
from methods._layers import block_linear_names
from methods.base import Context, PeftMethod, register_method

if TYPE_CHECKING:  # annotations only
    import torch

    from tasks.base import Task


@dataclass
class Ia3Options:
    target_modules: list = option([], "module names to adapt, or all-linear (default: per architecture)")
    feedforward_modules: list = option(
        [], "ia3: which of --target-modules are feed-forward layers (input rescaled; default: per architecture)"
    )

    def validate(self) -> None:
        if self.feedforward_modules and not self.target_modules:
            raise FtctlError("--feedforward-modules needs --target-modules (it names a subset of them)")
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra:
            raise FtctlError(f"--feedforward-modules {', '.join(extra)} must also be in --target-modules")


def default_targets(model_type: str) -> tuple[list[str], list[str]] | None:
    """PEFT's (target, feed-forward) modules for a model type, or None."""
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )  # deferred: a heavy import (seconds), paid only by the runs that use it

    targets = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
    feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    return (list(targets), list(feedforward)) if targets and feedforward is not None else None


@register_method
class Ia3(PeftMethod):
    name = "ia3"
    description = "(IA)^3: learned rescaling of attention keys/values and feed-forward activations, through PEFT"
    trains = "rescaling vectors + head"
    Options = Ia3Options
    mergeable = True
    defaults = {"*": {"learning_rate": 3e-3, "epochs": 5.0}}

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        model_type = ctx.model_config.model_type
        if not self.opts.target_modules and default_targets(model_type) is None:
            raise FtctlError(
                f"ia3 has no default target modules for {model_type} models; pass --target-modules (the attention "
                "key/value and feed-forward output layers) and --feedforward-modules (the feed-forward ones)"
            )

    def targets(self, model: torch.nn.Module, model_type: str) -> tuple[list[str], list[str]]:
        if not self.opts.target_modules:
            return default_targets(model_type)  # type: ignore[return-value]  # check() made sure it exists
        targets = list(self.opts.target_modules)
        linear = block_linear_names(model)
        if targets == ["all-linear"]:
            targets = linear
        leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t.rsplit(".", 1)[-1] not in leaves]
        if missing:
            raise FtctlError(
                f"target module(s) {', '.join(missing)} not found in this {model_type} model; its block linear layers "
                f"are: {', '.join(linear)}"
            )
        return targets, list(self.opts.feedforward_modules)

    def apply(self, model: torch.nn.Module, task: Task, ctx: Context) -> torch.nn.Module:
        from peft import IA3Config  # deferred: a heavy import (seconds), paid only by the runs that use it

        targets, feedforward = self.targets(model, ctx.model_config.model_type)
        config = IA3Config(
            task_type=task.fit.peft_task_type,
            target_modules=targets,
            feedforward_modules=feedforward,
            modules_to_save=task.head_modules(model) or None,
        )
        return self.wrap(model, config, ctx)
