"""Bottleneck adapters (PEFT has none; the layers are in methods/_bottleneck.py).

- Houlsby (Houlsby et al. 2019, arXiv:1902.00751): an adapter after the attention output projection and after the
  feed-forward output projection of every block, before the residual add and layer norm.
- Pfeiffer (Pfeiffer et al. 2021, arXiv:2005.00247): after the feed-forward output projection only.

The backbone, layer norms included, stays frozen (Houlsby et al. also trained the norms): the result is the adapters
and the task head, saved alone (`adapter_model.safetensors`, parameter names as in the full model, and
`adapter_config.json` with the placement, size, non-linearity and base model). Loading rebuilds the model from the
base and reproduces the fine-tuned outputs exactly. Adapters are non-linear, so there is nothing to merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftctl.errors import FtctlError
from ftctl.options import option
from methods._bottleneck import adapter_names, adapter_sites, inject, load_adapter, save_adapter
from methods.base import Context, Method, freeze_all_but, register_method

if TYPE_CHECKING:  # annotations only
    import torch
    from transformers import PreTrainedTokenizerBase, Trainer

    from tasks.base import Task

STYLES = ("houlsby", "pfeiffer")
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclass
class AdapterOptions:
    adapter_size: int = option(64, "bottleneck width of each adapter (its down-projection size)")
    adapter_style: str = option(
        "houlsby", "houlsby: after attention and feed-forward; pfeiffer: after feed-forward only", choices=STYLES
    )
    adapter_non_linearity: str = option("relu", "non-linearity inside each adapter", choices=NON_LINEARITIES)

    def validate(self) -> None:
        if self.adapter_size < 1:
            raise FtctlError(f"--adapter-size must be at least 1, got {self.adapter_size}")


@register_method
class Adapter(Method):
    name = "adapter"
    description = "bottleneck adapters (Houlsby: after attention and feed-forward; Pfeiffer: after feed-forward)"
    trains = "bottleneck adapters + head"
    Options = AdapterOptions
    is_peft = True  # saves an adapter directory to load onto the base model
    frozen_weights_in_autocast_dtype = True
    merge_refusal = "bottleneck adapters are non-linear and cannot be folded into the weights; evaluate the run as is"
    # SST-2 with MiniLM (2,000 sentences, 5 epochs, all of dev.tsv): 1e-3 fitted the training phrases and reached
    # 0.764 on the dev sentences, 3e-4 reached 0.827, 1e-4 0.795; regression heads diverge at 1e-3 (measured for LoRA
    # on STS-B). At 3e-4 the 5-epoch result swung with the seed (0.795 seed 42, 0.813 seed 43); 3 epochs gave 0.812
    # on seed 42 with less fitting of the training phrases, so classification takes 3 epochs
    defaults = {
        "*": {"learning_rate": 1e-3, "epochs": 5.0},
        "classification": {"learning_rate": 3e-4, "epochs": 3.0},
        "regression": {"learning_rate": 3e-4},
    }

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.sites: list[str] = []
        self.heads: list[str] = []

    def apply(self, model: torch.nn.Module, task: Task, ctx: Context) -> torch.nn.Module:
        self.sites = adapter_sites(model, self.opts.adapter_style)
        inject(model, self.sites, self.opts.adapter_size, self.opts.adapter_non_linearity)
        self.heads = task.head_modules(model)
        freeze_all_but(model, adapter_names(model) + self.heads)
        return model

    def save(self, trainer: Trainer, path: str) -> None:
        """Adapters and head only. Every process calls this: under ZeRO-3 they all take part in gathering."""
        model = trainer.model
        state = trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else model)
        if trainer.args.should_save:
            config = {
                "style": self.opts.adapter_style,
                "size": self.opts.adapter_size,
                "non_linearity": self.opts.adapter_non_linearity,
                "sites": self.sites,
                "modules_to_save": self.heads,
                "base_model_name_or_path": model.name_or_path,
            }
            save_adapter(state, adapter_names(model) + self.heads, config, path)

    def load_trained(
        self, task: Task, path: str, base: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]
    ) -> Any:

        return load_adapter(task.build_model(base, tokenizer, load_kwargs), path)

    def record(self, model: torch.nn.Module) -> dict[str, Any]:
        return {
            "adapter": {
                "style": self.opts.adapter_style,
                "size": self.opts.adapter_size,
                "non_linearity": self.opts.adapter_non_linearity,
                "sites": len(self.sites),
            }
        }
