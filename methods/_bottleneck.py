"""Bottleneck adapter layers and where they go; the `adapter` method (methods/adapter.py) trains them.

An adapter is `h + up(act(down(h)))` with `up` initialised to zero, so a model starts exactly as the pretrained
one. It is attached as a child module (`.adapter`) of the projection it follows, and a forward hook passes that
projection's output through it: the base model's modules and parameter names stay as they are, and the adapters'
names (`...output.dense.adapter.down.weight`) say where each one sits.

Sites are found by structure: in every block of every layer stack, the last linear layer of each outermost
attention module (its output projection) and the last linear layer of the block (the feed-forward output). This
holds for BERT, RoBERTa, DistilBERT, GPT-2, Llama-style decoders, T5 and BART.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftctl.errors import FtctlError
from methods._layers import layer_stacks

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
ADAPTER_TYPE = "ftctl-bottleneck"


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))), computed in the adapter's own precision; `up` starts at zero (the identity)."""

    def __init__(self, dim: int, size: int, non_linearity: str):
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(size, dim)
        nn.init.normal_(self.down.weight, std=1e-2)  # Houlsby et al.: near-identity initialisation
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        update = self.up(self.act(self.down(hidden.to(self.down.weight.dtype))))
        return hidden + update.to(hidden.dtype)


def linear_out(module: nn.Module) -> int | None:
    """Output width of a linear layer (nn.Linear or GPT-2's Conv1D), None for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return module.nf
    return None


def last_linear(module: nn.Module, prefix: str) -> str | None:
    """The last linear layer inside `module`, in registration (= forward) order."""
    found = None
    for name, sub in module.named_modules():
        if linear_out(sub) is not None:
            found = f"{prefix}.{name}" if name else prefix
    return found


def adapter_sites(model: nn.Module, style: str) -> list[str]:
    """Names of the projections an adapter follows, in model order (houlsby: attention and feed-forward outputs;
    pfeiffer: feed-forward outputs)."""
    sites: list[str] = []
    for stack_name, blocks in layer_stacks(model):
        for i, block in enumerate(blocks):
            name = f"{stack_name}.{i}"
            if style == "houlsby":
                attentions: list[str] = []
                for sub_name, sub in block.named_modules():
                    if not sub_name or any(sub_name.startswith(a + ".") for a in attentions):
                        continue  # the block itself, or inside an attention module already taken
                    if "attention" in type(sub).__name__.lower():
                        attentions.append(sub_name)
                sites += [s for a in attentions if (s := last_linear(block.get_submodule(a), f"{name}.{a}"))]
            ffn = last_linear(block, name)
            if ffn and ffn not in sites:
                sites.append(ffn)
    if not sites:
        raise FtctlError(f"cannot find transformer blocks with linear layers in '{type(model).__name__}' for adapters")
    return sites


def _through_adapter(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return module.adapter(output)


def inject(model: nn.Module, sites: list[str], size: int, non_linearity: str) -> None:
    """Attach an adapter after each named projection."""
    for name in sites:
        projection = model.get_submodule(name)
        adapter = BottleneckAdapter(linear_out(projection), size, non_linearity)
        projection.add_module("adapter", adapter.to(next(projection.parameters()).device))
        projection.register_forward_hook(_through_adapter)


def adapter_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)]


def save_adapter(state: dict[str, torch.Tensor], modules: list[str], config: dict[str, Any], path: str) -> None:
    """Write the weights of `modules` (adapters and head) from a full state dict, and the config that rebuilds them."""
    keep = tuple(f"{name}." for name in modules)
    weights = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(keep)}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps({"adapter_type": ADAPTER_TYPE, **config}, indent=2) + "\n", encoding="utf-8")


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Put saved adapters (and the task head saved with them) onto `model`, the base model built for the task."""
    path = Path(path)
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    if config.get("adapter_type") != ADAPTER_TYPE:
        raise FtctlError(f"{path / CONFIG} does not describe ftctl bottleneck adapters")
    inject(model, config["sites"], config["size"], config["non_linearity"])
    state = load_file(str(path / WEIGHTS))
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise FtctlError(f"{path / WEIGHTS} holds weights this model lacks (e.g. {unknown[0]}); is it the same base?")
    model.load_state_dict(state, strict=False)
    return model
