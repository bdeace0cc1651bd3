"""Finding the parts of a transformer by structure, not by architecture name.

Layer stacks are the outermost `ModuleList`s of identical blocks (BERT `encoder.layer`, GPT-2 `h`, Llama `layers`,
T5 `encoder.block`/`decoder.block`); embeddings are `nn.Embedding`s and modules named `*embed*`. This covers BERT,
DistilBERT, RoBERTa, GPT-2, Llama-style decoders, T5 and BART without a per-model table.
"""

from __future__ import annotations

import torch
from torch import nn


def layer_stacks(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """(name, blocks) for each stack of repeated transformer blocks, outermost only, in model order."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in stacks):
            continue
        kinds = {type(block) for block in module}
        if len(kinds) == 1 and all(any(True for _ in block.parameters()) for block in module):
            stacks.append((name, module))
    return stacks


def embedding_modules(model: torch.nn.Module) -> list[str]:
    """Names of the input embedding modules (token, position, type embeddings and their norms), outside the blocks."""
    inside = [stack for stack, _ in layer_stacks(model)]
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(n + ".") for n in names + inside):
            continue
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(module, nn.Embedding) or "embed" in leaf or leaf in ("wte", "wpe", "shared"):
            if any(True for _ in module.parameters()):
                names.append(name)
    return names


def block_linear_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers inside the transformer blocks: LoRA's 'all-linear', never the task head."""
    names: dict[str, None] = {}
    for _, stack in layer_stacks(model):
        for sub_name, module in stack.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                names[sub_name.rsplit(".", 1)[-1]] = None
    return list(names)
