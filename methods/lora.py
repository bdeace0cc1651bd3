"""LoRA and its variants, through PEFT.

- `lora`: low-rank updates W + (alpha/r) B A on chosen linear layers (Hu et al. 2021, arXiv:2106.09685).
- `rslora`: rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732).
- `dora`: weight-decomposed LoRA, magnitude and direction trained apart (Liu et al. 2024, arXiv:2402.09353).
- `qlora`, `qlora8`: LoRA on a base that bitsandbytes loads quantized, 4-bit NF4 with double quantization or 8-bit
  (Dettmers et al. 2023, arXiv:2305.14314): the same options, targets and defaults, plus load-time quantization and
  PEFT's k-bit preparation (methods/_qlora.py). The task head stays in full precision.

The task head is always trained and saved (`modules_to_save`), so the adapter directory alone reproduces the
fine-tuned model on top of the base; it loads with plain `peft.PeftModel.from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftctl.errors import FtctlError
from ftctl.options import option
from methods import _qlora as qlora
from methods._layers import block_linear_names
from methods.base import Context, PeftMethod, register_method
from tasks.base import Task

if TYPE_CHECKING:  # annotations only
    import torch
    from transformers import PreTrainedTokenizerBase

# Default target modules by model type: the attention query/value projections for encoders and T5 (the LoRA
# paper's choice), every linear layer of the blocks for modern decoder LLMs (QLoRA's finding that all-linear
# LoRA matches full fine-tuning).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "camembert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
}
ALL_LINEAR = "all-linear"
# alpha = 4r at the default r = 8: measured on SST-2 with MiniLM (bench/RESULTS.md), scaling 4 beat the common
# alpha = 2r (0.811 vs 0.806 mean dev accuracy over three seeds, lowest 0.804 vs 0.790).
DEFAULT_ALPHA = 32


@dataclass
class LoraOptions:
    lora_r: int = option(8, "LoRA rank r")
    lora_alpha: int | None = option(
        None, "LoRA scaling alpha; updates are scaled by alpha/r, alpha/sqrt(r) for rslora (default: 32; rslora 12)"
    )
    lora_dropout: float = option(0.1, "dropout on the LoRA path")
    target_modules: list = option([], "module names to adapt, or all-linear (default: per architecture)")
    lora_bias: str = option("none", "which biases train: none, all, lora_only", choices=("none", "all", "lora_only"))

    def validate(self) -> None:
        if self.lora_r < 1:
            raise FtctlError(f"--lora-r must be at least 1, got {self.lora_r}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise FtctlError(f"--lora-alpha must be greater than 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise FtctlError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")


def resolve_targets(model: torch.nn.Module, model_type: str, requested: list[str]) -> list[str]:
    """The leaf module names LoRA adapts, checked against the model."""
    targets = list(requested) or DEFAULT_TARGETS.get(model_type, [ALL_LINEAR])
    linear = block_linear_names(model)
    if targets == [ALL_LINEAR]:
        targets = linear
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise FtctlError(
            f"target module(s) {', '.join(missing)} not found in this {model_type} model; its block linear layers "
            f"are: {', '.join(linear)} (or pass --target-modules all-linear)"
        )
    return targets


@register_method
class Lora(PeftMethod):
    name = "lora"
    description = "low-rank adapters on the attention (and MLP) projections, through PEFT"
    trains = "low-rank adapters + head"
    Options = LoraOptions
    variants = {
        "lora": {},
        # alpha 12: at the default r = 8 the update is scaled by 12/sqrt(8) = 4.2, about LoRA's 32/8 = 4, and rsLoRA's
        # 1/sqrt(r) rule takes over as r changes; with LoRA's alpha 32 (scale 11.3) SST-2 with MiniLM fell to 0.787
        # on dev, with 12 it reached 0.820 (bench/RESULTS.md)
        "rslora": {
            "use_rslora": True,
            "default_alpha": 12,
            "description": "rank-stabilized LoRA: the update scaled by alpha/sqrt(r), not alpha/r",
        },
        "dora": {
            "use_dora": True,
            "description": "weight-decomposed LoRA (DoRA): a learned magnitude per output, LoRA on the direction",
        },
        "qlora": {
            "bits": 4,
            "description": "LoRA on a bitsandbytes 4-bit NF4 base (double quantization)",
            "trains": "low-rank adapters + head, base quantized",
        },
        "qlora8": {
            "bits": 8,
            "description": "LoRA on a bitsandbytes 8-bit (LLM.int8()) base",
            "trains": "low-rank adapters + head, base quantized",
        },
    }
    refusals = qlora.quantization_refusals()
    mergeable = True
    # Per task kind, from measurements with MiniLM on 2 CPU cores (../shared/BENCHMARKS.md, bench/RESULTS.md): on
    # SST-2 the attention query/value default at lr 1e-3 for 5 epochs beat plain-library LoRA; NER with query/value
    # only reached entity F1 0.575 after an epoch where every linear layer at r=16 reached 0.815; STS-B regression
    # collapsed to a constant at lr 1e-3 and reached Pearson 0.861 at 3e-4 with every linear layer at r=16.
    defaults = {
        "*": {"learning_rate": 5e-4},
        # LoRA dropout stays 0.1 on classification: without it (PEFT's default, and 10% less step time on 2 CPU
        # cores) the validation accuracy peaked at the first epoch and SST-2 dev fell to 0.781 (bench/RESULTS.md)
        "classification": {"learning_rate": 1e-3, "epochs": 5.0},
        "regression": {"learning_rate": 3e-4, "target_modules": [ALL_LINEAR], "lora_r": 16},
        "tokens": {"learning_rate": 1e-3, "target_modules": [ALL_LINEAR], "lora_r": 16},
    }

    @property
    def frozen_weights_in_autocast_dtype(self) -> bool:  # type: ignore[override]
        # DoRA normalizes base weight + update outside the autocast products: the base must stay in fp32
        return not self.settings.get("use_dora", False)

    @property
    def quantized_variant(self) -> str | None:
        return "qlora" if self.bits is None else None

    @property
    def bits(self) -> int | None:
        """4 or 8 for the quantized variants (qlora, qlora8), else None."""
        return self.settings.get("bits")

    def peft_config(self, model: torch.nn.Module, task: Task, ctx: Context) -> Any:
        from peft import LoraConfig  # deferred: a heavy import (seconds), paid only by the runs that use it

        return LoraConfig(
            task_type=task.fit.peft_task_type,
            r=self.opts.lora_r,
            lora_alpha=self.opts.lora_alpha or self.settings.get("default_alpha", DEFAULT_ALPHA),
            lora_dropout=self.opts.lora_dropout,
            target_modules=resolve_targets(model, ctx.model_config.model_type, self.opts.target_modules),
            bias=self.opts.lora_bias,
            modules_to_save=task.head_modules(model) or None,
            use_rslora=self.settings.get("use_rslora", False),
            use_dora=self.settings.get("use_dora", False),
        )

    def load_kwargs(self, ctx: Context) -> dict[str, Any]:
        if self.bits is None:
            return {}
        return qlora.quantization_kwargs(self.bits, ctx.task, ctx.model_config, ctx.launch.deepspeed_stage)

    def apply(self, model: torch.nn.Module, task: Task, ctx: Context) -> torch.nn.Module:
        if self.bits is not None:
            # deferred: a heavy import (seconds), paid only by the runs that use it
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                qlora.unpacked(model),
                use_gradient_checkpointing=ctx.cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        return self.wrap(model, self.peft_config(model, task, ctx), ctx)

    def record(self, model: torch.nn.Module) -> dict[str, Any]:
        return qlora.quantization_record(model, self.bits) if self.bits is not None else {}

    def load_trained(
        self, task: Task, path: str, base: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]
    ) -> Any:
        model = super().load_trained(task, path, base, tokenizer, load_kwargs)
        return qlora.unpacked(model) if self.bits is not None else model

    def merge(
        self, task: Task, path: str, base: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]
    ) -> tuple[Any, list]:
        if self.bits is None:
            return super().merge(task, path, base, tokenizer, load_kwargs)
        return qlora.merge_dequantized(task, path, base, tokenizer, load_kwargs, self.bits)
