"""A memory-lean loss for decoder language-model tasks (`--loss-kernel auto|fused|chunked|plain`).

The stock causal-LM loss computes logits for every position of every sequence, casts them to fp32 and keeps them for
the backward pass: for Llama-3's 128k vocabulary at 2,048 tokens that is about 1 GiB per sequence, often the largest
tensor of a QLoRA step, and most of it is for prompt tokens that have no label. Here the model runs as usual, through
every wrapper (DDP, DeepSpeed, PEFT), asked for the logits of one position only (`logits_to_keep=1`); the decoder's
final hidden states are taken from it by a forward hook; and the cross-entropy is computed at the positions that have
a label only, in chunks, each chunk's logits recomputed in the backward pass (activation checkpointing), so that at
most one chunk of logits exists at a time. The loss, its gradients and its reduction (summed and divided by the
`num_items_in_batch` the Trainer counts across accumulation and processes, as transformers' `ForCausalLMLoss` does)
equal the stock loss's (tests/run/test_lm_loss.py).

- `chunked`: the above, in plain torch, on any device;
- `fused`: Liger Kernel's fused linear + cross-entropy on CUDA (`pip install ftctl[gpu]`), which never builds a
  logits chunk in fp32 at all; it needs an output layer without an adapter on it;
- `plain`: the model's own loss;
- `auto`: `fused` where it can run, else `chunked`; `plain` for methods whose forward changes the loss or the
  positions (AdaLoRA adds its orthogonality penalty to the model's loss; prompt tuning prepends virtual tokens), and
  under DeepSpeed ZeRO-3, which shards the output layer's weight and gathers it only inside the model's forward: the
  lean losses call that layer after the forward (and recompute it in the backward pass), where it holds no weight.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ftctl.errors import FtctlError
from ftctl.vocab import LOSS_KERNELS, Family
from methods.base import Method
from tasks.base import Task

CHOICES = LOSS_KERNELS
CHUNK = 1024  # label positions whose logits are computed at once


@dataclass(frozen=True)
class LossChoice:
    kernel: str  # fused, chunked or plain
    why: str


ZERO3 = "DeepSpeed ZeRO-3 shards the output layer, which the lean loss calls outside the model's forward"


def for_run(task: Task, method: Method, cuda: bool, zero3: bool) -> LossChoice:
    """The loss a run trains with: the lean LM loss for decoder LM tasks where the method and the launch allow it,
    else the model's own. Asked before any weights are loaded (a refusal costs nothing) and again by the Trainer."""
    return choose(
        str(getattr(task.opts, "loss_kernel", "plain")),
        task.fit.loss_counts_items and task.fit.family == Family.DECODER,
        method.plain_loss_reason() or (ZERO3 if zero3 else None),
        cuda,
    )


def choose(requested: str, decoder_lm: bool, method_reason: str | None, cuda: bool) -> LossChoice:
    """Which loss a run uses, and why; refuses a kernel that cannot run here, in one line. `method_reason`: why
    the method (or the launch) needs the model's own loss."""
    if requested not in CHOICES:
        raise FtctlError(f"--loss-kernel must be one of {', '.join(CHOICES)}, got {requested!r}")
    if not decoder_lm:
        if requested in ("fused", "chunked"):
            raise FtctlError(
                f"--loss-kernel {requested} is for decoder language-model tasks; this run's model has its own head"
            )
        return LossChoice("plain", "not a decoder language-model task")
    if requested == "plain":
        return LossChoice("plain", "asked for")
    if method_reason:
        if requested != "auto":
            raise FtctlError(f"--loss-kernel {requested}: {method_reason}; use --loss-kernel plain (or auto)")
        return LossChoice("plain", method_reason)
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    if requested == "fused" and not liger:
        raise FtctlError(
            "--loss-kernel fused needs a CUDA GPU and Liger Kernel (pip install 'ftctl[gpu]'); use chunked, which "
            "runs anywhere"
        )
    if requested == "fused" or (requested == "auto" and liger):
        return LossChoice("fused", "Liger Kernel's fused linear + cross-entropy (CUDA)")
    return LossChoice("chunked", "logits only at labelled positions, a chunk at a time")


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(decoder, output layer, config) of the causal LM inside the wrappers (DDP, DeepSpeed, PEFT)."""
    base: Any = model
    while hasattr(base, "module") and isinstance(base.module, torch.nn.Module):
        base = base.module
    if hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return base.get_decoder(), base.get_output_embeddings(), base.config


def _chunk_loss(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> Any:
    logits = head(states).float()
    if softcap:  # Gemma-2's final logit soft-capping, as its forward applies it
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where in the flattened batch a hidden state predicts a label: row r, position t (t < length - 1) whose next
    token's label is not -100, as the index r * length + t."""
    rows, positions = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    return rows * labels.shape[1] + positions


def causal_lm_loss(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
    kernel: str = "chunked",
    chunk: int = CHUNK,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal-LM loss of `labels` (token t predicts t + 1; -100 ignored), without full-vocabulary logits.
    `autocast`: the mixed-precision context the model's forward runs in (accelerate wraps the forward alone in it;
    the output layer is called here, and must compute in the same precision as it would inside the forward).
    `positions`: `labelled_positions(labels)` where the caller has them (the planner's fake tensors hold no
    labels to find them from)."""
    decoder, head, config = _parts(model)
    captured: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = decoder.register_forward_hook(keep)
    try:
        model(**{**inputs, "logits_to_keep": 1, "use_cache": False})
    finally:
        handle.remove()
    hidden = captured["hidden"]
    positions = labelled_positions(labels) if positions is None else positions
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    targets = labels.reshape(-1).index_select(0, positions + 1)
    softcap = getattr(config, "final_logit_softcapping", None)
    with autocast():  # checkpoint records it and recomputes each chunk in it during the backward pass
        if kernel == "fused":
            total = _fused(head, states, targets, softcap)
        else:
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, targets.shape[0], chunk):
                part = slice(start, start + chunk)
                total = total + checkpoint(_chunk_loss, head, states[part], targets[part], softcap, use_reentrant=False)
    if num_items_in_batch is None:  # a mean over the labelled positions, as cross_entropy's "mean"
        return total / targets.shape[0] if targets.shape[0] else total
    count = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    return total / count


def _fused(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> Any:
    if not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
        raise FtctlError(
            "--loss-kernel fused needs a plain output layer; this method adapts it (an adapter on lm_head): use "
            "--loss-kernel chunked"
        )
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # deferred: an optional CUDA extra

    fused = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=softcap)
    return fused(head.weight, states, targets, head.bias)
