"""What the trace on this machine's CPU cannot see, added from the launch: bitsandbytes' 4/8-bit storage and
de-quantized copies, ZeRO sharding and offload, DDP's gradient buckets."""

from __future__ import annotations

from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from ftctl.facts import LaunchFacts


def quantized_weights(model: torch.nn.Module, quantization: Any) -> dict[int, int]:
    """id -> number of parameters of the weights bitsandbytes would quantize: the linear layers outside the modules
    it keeps in full precision (transformers' rule for `llm_int8_skip_modules`)."""
    if quantization is None:
        return {}
    keep = list(getattr(quantization, "llm_int8_skip_modules", None) or [])
    out: dict[int, int] = {}
    for name, module in model.named_modules():
        if type(module) not in (torch.nn.Linear, Conv1D):
            continue
        if any(name == k or f"{k}." in f"{name}." for k in keep):
            continue
        out[id(module.weight)] = module.weight.numel()
    return out


def compute_like_bitsandbytes(model: torch.nn.Module, quantized: dict[int, int], quantization: Any) -> None:
    """The layers bitsandbytes would quantize compute as its layers do: the input cast to the compute dtype (bf16
    for NF4, fp16 for LLM.int8()), the product in it, the output cast back; so the trace keeps the activations
    they keep. Their weights are held in that dtype here and counted at their 4/8-bit size afterwards."""
    if not quantized:
        return
    dtype = getattr(quantization, "bnb_4bit_compute_dtype", None) if quantization.load_in_4bit else torch.float16
    dtype = dtype or torch.bfloat16

    inputs: dict[int, torch.dtype] = {}

    def cast_in(module: torch.nn.Module, args: tuple) -> tuple:
        inputs[id(module)] = args[0].dtype
        return (args[0].to(dtype), *args[1:])

    def cast_out(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(inputs[id(module)])

    for module in model.modules():
        if id(getattr(module, "weight", None)) in quantized:
            module.to(dtype).requires_grad_(False)  # on the meta device: the same parameters, converted
            module.register_forward_pre_hook(cast_in)
            module.register_forward_hook(cast_out)


def quantized_bytes(numel: int, bits: int) -> float:
    """bitsandbytes storage: NF4 packs two values a byte, with one absmax per 64 values double-quantized to 8 bits
    (and one fp32 constant per 256 of those); LLM.int8() stores a byte a value and one fp32 scale per row (rows
    are at least 64 wide in any model, so at most 1/16 byte a value: counted as such)."""
    if bits == 4:
        return numel / 2 + numel / 64 + numel / 64 / 256 * 4
    return numel + numel / 16


def launch_parts(parts: dict[str, float], launch: LaunchFacts, largest_layer: float) -> tuple[dict[str, float], float]:
    """The traced single-process parts as each process of the launch holds them, and what DeepSpeed offloads."""
    n = max(1, launch.num_processes)
    stage = launch.deepspeed_stage or 0
    offloaded = 0.0
    if launch.deepspeed_stage is None and n > 1:
        parts["ddp buckets"] = parts["gradients"]  # DDP reduces gradients through bucket copies of them
    if stage >= 1:
        parts["optimizer"] /= n
    if stage >= 2:
        parts["gradients"] /= n
    if stage >= 3:
        parts["weights"] /= n
        parts["zero-3 gathered layers"] = 2 * largest_layer  # the layer computed and the one prefetched
    if launch.deepspeed_offload:
        offloaded = parts["optimizer"]
        parts["optimizer"] = 0.0
    return parts, offloaded
