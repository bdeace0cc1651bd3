"""The method interface and registry.

A method decides what is loaded (quantized or not), what is frozen, injected or wrapped, the optimizer's parameter
groups, per-step hooks, and how the result is saved and loaded again. It works on whatever model the task built and
always keeps the task's head trainable and saved. Variants that are configuration of one method (rsLoRA and DoRA
of LoRA) register extra names with fixed settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ftctl.config import RunConfig
from ftctl.errors import FtctlError
from ftctl.facts import DataFacts, LaunchFacts
from ftctl.options import OptionSpec, specs_of
from ftctl.registry import Registry
from ftctl.vocab import Family, TaskKind
from methods import _matrix as matrix
from tasks.base import Task

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase, Trainer


@dataclass
class NoOptions:
    pass


@dataclass(frozen=True)
class Context:
    """What a method may look at before the model is loaded, to refuse a combination early; `data` is known once
    the training data is loaded, before `apply`."""

    cfg: RunConfig
    task: Task
    model_config: PretrainedConfig
    family: Family
    launch: LaunchFacts = LaunchFacts()
    data: DataFacts | None = None


class Method:
    name: ClassVar[str]
    description: ClassVar[str]
    trains: ClassVar[str]  # what it trains, in a few words (for `ftctl list`)
    Options: ClassVar[type] = NoOptions
    variants: ClassVar[dict[str, dict[str, Any]]] = {}  # registered name -> fixed settings; empty: just `name`
    is_peft: ClassVar[bool] = False  # saves an adapter (loaded onto the base model) rather than a full model
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # task kind (or "*") -> run option defaults
    refusals: ClassVar[tuple[matrix.Refusal, ...]] = ()  # combinations it cannot run: its row of methods/_matrix.py
    mergeable: ClassVar[bool] = False  # `ftctl merge` can fold the trained result into the base weights
    merge_refusal: ClassVar[str] = "its run directory already holds a full model; load it with transformers"
    # Whether the frozen linear layers may be stored in the autocast dtype for training (see `frozen_linears_to`):
    # true where the frozen weights only ever feed autocast matrix products and are never saved
    frozen_weights_in_autocast_dtype: ClassVar[bool] = False

    def __init__(self, opts: Any, variant: str, settings: dict[str, Any]):
        self.opts = opts
        self.variant = variant
        self.settings = settings

    @property
    def quantized_variant(self) -> str | None:
        """The registered name of this method on a 4-bit base, which learns the same adapter in less memory (what
        `ftctl plan` suggests when a run does not fit), or None."""
        return None

    def plain_loss_reason(self) -> str | None:
        """Why this method needs the model's own loss (not launch/run/lm_loss.py's lean one), or None."""
        return None

    @property
    def summary(self) -> str:
        """What this variant is, in a line (a variant may describe itself: qlora)."""
        return str(self.settings.get("description", type(self).description))

    def check(self, ctx: Context) -> None:
        """Refuse combinations that cannot work, before anything heavy is loaded: the method's `refusals` (the
        compatibility matrix); subclasses add checks of their own options after calling this."""
        message = matrix.refusal(type(self), self.variant, matrix.Cell.of(ctx))
        if message:
            raise FtctlError(message)

    def load_kwargs(self, ctx: Context) -> dict[str, Any]:
        """Extra `from_pretrained` arguments (quantization, dtype)."""
        return {}

    def apply(self, model: torch.nn.Module, task: Task, ctx: Context) -> torch.nn.Module:
        """Freeze, inject or wrap; return the model to train."""
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, args: Any, decay_names: set[str]) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups, or None for the Trainer's own (decay on matrices, not on biases/norms).
        `args` are the TrainingArguments (base learning rate, weight decay); `decay_names` the parameters that
        take weight decay."""
        return None

    def callbacks(self) -> list[Any]:
        """Trainer callbacks, e.g. a per-step hook."""
        return []

    def record(self, model: torch.nn.Module) -> dict[str, Any]:
        """Extra facts for run.json's "method" entry (e.g. parameter groups, final ranks)."""
        return {}

    def save(self, trainer: Trainer, path: str) -> None:
        """Write the trained result (adapter or full model) to `path`; the Trainer gathers it under ZeRO-3."""
        trainer.save_model(path)

    def load_trained(
        self, task: Task, path: str, base: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]
    ) -> Any:
        """Load what `save` wrote, ready for evaluation."""
        return task.build_model(path, tokenizer, load_kwargs)

    def merge(
        self, task: Task, path: str, base: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]
    ) -> tuple[Any, list]:
        """What `save` wrote folded into the base weights, as a plain transformers model (`ftctl merge`), and notes
        on how it was made. Only `mergeable` methods implement it."""
        raise FtctlError(f"method '{self.variant}' has nothing to merge: {self.merge_refusal}")


class PeftMethod(Method):
    """A method whose result is a PEFT adapter (plus the task head, `modules_to_save`): trained through
    `get_peft_model`, saved by the Trainer as an adapter, loaded back with `PeftModel.from_pretrained`."""

    is_peft = True
    frozen_weights_in_autocast_dtype = True

    def wrap(self, model: torch.nn.Module, config: Any, ctx: Context) -> Any:
        from peft import get_peft_model  # deferred: a heavy import (seconds), paid only by the runs that use it

        if ctx.cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        return get_peft_model(model, config)

    def load_trained(
        self, task: Task, path: str, base: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]
    ) -> Any:
        from peft import PeftModel  # deferred: a heavy import (seconds), paid only by the runs that use it

        return PeftModel.from_pretrained(task.build_model(base, tokenizer, load_kwargs), path)

    def merge(
        self, task: Task, path: str, base: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]
    ) -> tuple[Any, list]:
        """The adapter folded into the weights it modifies (`merge_and_unload`); the trained head replaces the
        base's."""
        if not self.mergeable:
            return super().merge(task, path, base, tokenizer, load_kwargs)
        return self.load_trained(task, path, base, tokenizer, load_kwargs).merge_and_unload(), []


@dataclass(frozen=True)
class MethodSpec:
    cls: type[Method]
    variant: str

    @property
    def settings(self) -> dict[str, Any]:
        return self.cls.variants.get(self.variant, {})

    @property
    def description(self) -> str:
        return str(self.settings.get("description", self.cls.description))

    @property
    def trains(self) -> str:
        return str(self.settings.get("trains", self.cls.trains))

    def option_specs(self) -> list[OptionSpec]:
        return specs_of(self.cls.Options, owner=f"method {self.cls.name}", group=f"{self.cls.name} method options")

    def run_defaults(self, task_kind: TaskKind) -> dict[str, Any]:
        """The method's run option defaults for a task kind; a variant's own `defaults` setting wins."""
        out: dict[str, Any] = {}
        for layer in (self.cls.defaults, self.settings.get("defaults", {})):
            out.update({**layer.get("*", {}), **layer.get(task_kind, {})})
        return out

    def create(self, user_opts: dict[str, Any]) -> Method:
        opts = self.cls.Options(**user_opts)
        if hasattr(opts, "validate"):
            opts.validate()
        return self.cls(opts, self.variant, self.settings)


METHODS: Registry[MethodSpec] = Registry("method")


def _check_kinds(cls: type[Method]) -> None:
    """Per-kind defaults name task kinds (or "*"): a misspelt kind would otherwise be silently ignored."""
    layers = [cls.defaults, *(settings.get("defaults", {}) for settings in cls.variants.values())]
    for layer in layers:
        for key in layer:
            if key != "*" and key not in {k.value for k in TaskKind}:
                kinds = ", ".join(k.value for k in TaskKind)
                raise ValueError(f"method '{cls.name}': defaults for unknown task kind {key!r} (kinds: {kinds}, *)")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under its name, or under each of its variant names."""
    _check_kinds(cls)
    for variant in cls.variants or {cls.name: {}}:
        METHODS.add(variant, MethodSpec(cls, variant))
    return cls


def freeze_all_but(model: torch.nn.Module, module_names: list[str]) -> None:
    """Freeze every parameter except those inside the named modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in module_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def frozen_linears_to(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen fp32 linear layers (`nn.Linear`, GPT-2's `Conv1D`) in `dtype`; returns the number of
    parameters converted. Under autocast to `dtype` this changes no result, since autocast casts those weights
    to `dtype` for every product anyway (and does not cache casts of frozen weights between steps): the
    conversion is done once instead of at every forward pass, and the frozen weights take half the memory.
    Parameters shared with another module (an LM head tied to the input embeddings) are left alone."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    converted = 0
    for module in model.modules():
        if type(module) not in (torch.nn.Linear, Conv1D):
            continue
        params = list(module.parameters(recurse=False))
        if not params or any(p.requires_grad or p.dtype != torch.float32 or uses[id(p)] > 1 for p in params):
            continue
        module.to(dtype)
        converted += sum(p.numel() for p in params)
    return converted


def trained_modules(model: torch.nn.Module) -> list[str]:
    """Trainable parameters as compact patterns (layer indices folded to `*`), for run.json."""
    patterns: dict[str, None] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            patterns[re.sub(r"\.\d+\.", ".*.", name)] = None
    return list(patterns)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters. PEFT's frozen copies of saved modules are not counted twice, and 4-bit
    packed weights and ZeRO-3 partitioned weights count as the parameters they hold."""
    trainable = total = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions leave a 0-element placeholder
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def saved_weights(path: Any) -> dict[str, Any]:
    """The weight files a saved result consists of and their size on disk (the adapter size of PEFT methods)."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt"))
    size = sum(p.stat().st_size for p in files)
    return {"files": [p.name for p in files], "bytes": size, "mb": size / 2**20}
