"""Full fine-tuning with layer-wise learning-rate decay (LLRD).

Every parameter trains, at a learning rate that shrinks with depth below the top: a block `d` blocks below the top
block trains at `lr x decay^d`, the embeddings (below the first block) at `lr x decay^L` for L blocks, and the
task head and the top block at `lr`. Lower layers hold the most general features and move least (Howard & Ruder
2018, "discriminative fine-tuning", arXiv:1801.06146; Sun et al. 2019, arXiv:1905.05583 for BERT).

Blocks are found structurally (`methods._layers`); an encoder-decoder's stacks count as one pile, encoder below
decoder. A parameter outside the blocks (a final norm) takes the depth of the block before it. The groups (depth,
learning rate, parameters, modules) are recorded in run.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftctl.errors import FtctlError
from ftctl.options import option
from methods._layers import embedding_modules, layer_stacks
from methods._matrix import Refusal
from methods.base import Context, Method, register_method

if TYPE_CHECKING:  # annotations only
    import torch

    from tasks.base import Task


@dataclass
class LlrdOptions:
    lr_decay: float = option(0.9, "learning-rate factor per layer below the top (1 = plain full fine-tuning)")

    def validate(self) -> None:
        if not 0 < self.lr_decay <= 1:
            raise FtctlError(f"--lr-decay must be in (0, 1], got {self.lr_decay}")


def layer_depths(model: torch.nn.Module, heads: list[str]) -> dict[str, tuple[int, str]]:
    """Parameter name -> (depth below the top, the block or module it belongs to). Depth 0: the top block, the head
    and anything above the blocks."""
    blocks: list[str] = [f"{name}.{i}" for name, stack in layer_stacks(model) for i in range(len(stack))]
    if not blocks:
        raise FtctlError(f"cannot find the transformer layers of '{type(model).__name__}' for layer-wise decay")
    top = len(blocks) - 1
    block_depth = {name: top - i for i, name in enumerate(blocks)}
    embeddings = embedding_modules(model)
    depths: dict[str, tuple[int, str]] = {}
    current = len(blocks)  # before the first block: embedding depth
    for name, _ in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if any(name.startswith(h + ".") for h in heads):
            depths[name] = (0, module)
        elif block is not None:
            current = block_depth[block]
            depths[name] = (current, block)
        elif any(name.startswith(e + ".") for e in embeddings):
            depths[name] = (len(blocks), module)
        else:
            depths[name] = (current, module)
    return depths


@register_method
class LayerwiseDecay(Method):
    name = "llrd"
    description = "full fine-tuning with layer-wise learning-rate decay (--lr-decay per layer below the top)"
    trains = "all parameters, lower layers slower"
    Options = LlrdOptions
    defaults = {"*": {"learning_rate": 1e-4}}
    refusals = (
        Refusal(
            "a DeepSpeed config with its own optimizer",
            lambda cell: cell.launch.deepspeed_optimizer,
            "method '{method}' sets per-layer learning rates as optimizer parameter groups, and the DeepSpeed config "
            'brings its own optimizer, which would replace them; remove its "optimizer" block (ftctl\'s ds_configs '
            "have none)",
            static=False,
        ),
    )

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.heads: list[str] = []
        self.groups: list[dict[str, Any]] = []

    def apply(self, model: torch.nn.Module, task: Task, ctx: Context) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        self.heads = task.head_modules(model)
        layer_depths(model, self.heads)  # refuse a model without layers now, not when the optimizer is built
        return model

    def param_groups(self, model: torch.nn.Module, args: Any, decay_names: set[str]) -> list[dict[str, Any]]:
        depths = layer_depths(model, self.heads)
        grouped: dict[tuple[int, bool], list[tuple[str, Any]]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                grouped.setdefault((depths[name][0], name in decay_names), []).append((name, p))
        groups, self.groups = [], []
        for (depth, decays), named in sorted(grouped.items(), key=lambda item: (-item[0][0], not item[0][1])):
            lr = args.learning_rate * self.opts.lr_decay**depth
            groups.append(
                {"params": [p for _, p in named], "lr": lr, "weight_decay": args.weight_decay if decays else 0.0}
            )
            self.groups.append(
                {
                    "depth": depth,
                    "learning_rate": lr,
                    "weight_decay": decays,
                    "parameters": sum(p.numel() for _, p in named),
                    "modules": list(dict.fromkeys(depths[n][1] for n, _ in named)),
                }
            )
        return groups

    def record(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"lr_decay": self.opts.lr_decay, "param_groups": self.groups}
