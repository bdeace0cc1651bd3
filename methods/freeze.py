"""Layer freezing: freeze the embeddings and the bottom layers, train the rest (top layers and the head).

`--freeze-layers N` freezes the bottom N blocks of every layer stack; `--train-last N` trains only the top N;
`--freeze-encoder` freezes the whole encoder of an encoder-decoder. With none given, all but the last block of each
stack are frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftctl.errors import FtctlError
from ftctl.options import option
from methods._layers import embedding_modules, layer_stacks
from methods.base import Context, Method, register_method

if TYPE_CHECKING:  # annotations only
    import torch

    from tasks.base import Task


@dataclass
class FreezeOptions:
    freeze_layers: int | None = option(
        None, "freeze the bottom N blocks of each layer stack (default: all but the last)"
    )
    train_last: int | None = option(None, "train only the top N blocks of each layer stack")
    freeze_embeddings: bool = option(True, "freeze the input embeddings")
    freeze_encoder: bool = option(False, "encoder-decoders: freeze the whole encoder, train the decoder")

    def validate(self) -> None:
        if self.freeze_layers is not None and self.train_last is not None:
            raise FtctlError("--freeze-layers and --train-last say the same thing two ways; give one")
        for name in ("freeze_layers", "train_last"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise FtctlError(f"--{name.replace('_', '-')} must not be negative, got {value}")


@register_method
class Freeze(Method):
    name = "freeze"
    description = "freeze the embeddings and bottom layers, fine-tune the top layers and the head"
    trains = "top layers + head"
    Options = FreezeOptions
    defaults = {"*": {"learning_rate": 1e-4}}

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if self.opts.freeze_encoder and ctx.family != "encoder-decoder":
            raise FtctlError(
                f"--freeze-encoder needs an encoder-decoder model; '{ctx.model_config.model_type}' is a {ctx.family}"
            )

    def apply(self, model: torch.nn.Module, task: Task, ctx: Context) -> torch.nn.Module:
        stacks = layer_stacks(model)
        if not stacks:
            raise FtctlError(f"cannot find the transformer layers of '{type(model).__name__}' to freeze")
        frozen: list[Any] = []
        for name, blocks in stacks:
            depth = len(blocks)
            if self.opts.freeze_encoder and ".encoder." in f".{name}.":
                frozen.append(model.get_submodule(name.rsplit(".", 1)[0]))  # the encoder, with its final norm
                continue
            if self.opts.train_last is not None:
                n = depth - self.opts.train_last
            elif self.opts.freeze_layers is not None:
                n = self.opts.freeze_layers
            else:
                n = depth - 1
            if n < 0 or n > depth:
                raise FtctlError(
                    f"layer stack '{name}' has {depth} blocks; cannot freeze {n} of them "
                    f"(check --freeze-layers/--train-last)"
                )
            frozen.extend(blocks[:n])
        if self.opts.freeze_embeddings:
            frozen.extend(model.get_submodule(n) for n in embedding_modules(model))
        for p in model.parameters():
            p.requires_grad_(True)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        return model
