"""Fitting a GPU: what a prediction needs on the device, and the first change of the run that would make it fit."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

from ftctl.errors import FtctlError
from launch.run import runs
from launch.run.arguments import batch_geometry
from launch.run.config import resolve_values
from launch.run.planning.predict import predict, shape_of
from launch.run.planning.prediction import Prediction

CUDA_CONTEXT_MB = 512.0  # the CUDA context and kernels: in the GPU's memory, not in torch's allocation statistics


FRAGMENTATION = 1.10  # the caching allocator reserves more than it hands out; 10% is a common margin


def parse_size(text: str) -> float:
    """A memory size (`16GiB`, `16GB`, `24000MiB`, `16` = GiB) in MiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise FtctlError(f"--gpu-memory {text!r} is not a size; write e.g. 16GiB, 24GB or 81920MiB")
    value, unit = float(match.group(1)), (match.group(2) or "GiB").upper().rstrip("B").rstrip("I")
    factor = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0**2}[unit]
    si = match.group(2) and "I" not in match.group(2).upper()  # GB: 10^9 bytes
    return value * factor * (1000 / 1024) ** {"K": 1, "M": 2, "G": 3, "T": 4}[unit] if si else value * factor


def needed_mb(prediction: Prediction) -> float:
    """What the run needs of a GPU: the predicted allocation with the allocator's margin, and the CUDA context."""
    return gpu_need_mb(prediction.peak_mb)


def gpu_need_mb(peak_mb: float) -> float:
    """What a process whose allocation peaks at `peak_mb` needs of a GPU (its margin and CUDA context added)."""
    return peak_mb * FRAGMENTATION + CUDA_CONTEXT_MB


def remedies(run: runs.Run) -> Iterator[tuple[str, dict[str, Any]]]:
    """Changes that lower peak memory without changing what is learnt, gentlest first: gradient checkpointing,
    smaller micro-batches (accumulating to the same batch), then the method's 4-bit variant where it has one
    (QLoRA for LoRA)."""
    cfg = run.cfg
    values: dict[str, Any] = {}
    if not cfg.gradient_checkpointing:
        values["gradient_checkpointing"] = True
        yield "--gradient-checkpointing", dict(values)
    micro, _ = batch_geometry(cfg, run.launch.num_processes)
    while micro > 1:
        micro //= 2
        values.update(micro_batch_size=micro, gradient_accumulation_steps=None)
        yield f"--gradient-checkpointing --micro-batch-size {micro}", dict(values)
    quantized = run.method.quantized_variant
    if quantized:
        flags = f"--method {quantized} --gradient-checkpointing --micro-batch-size {micro}"
        yield flags, {**values, "method": quantized}


def suggestion(run: runs.Run, tokenizer: Any, encoded: Any, limit_mb: float, device: str) -> str:
    """The first remedy whose prediction fits `limit_mb`, or why none does."""
    base = {k: v for k, v in run.flat().items() if k in run.explicit}
    for flags, change in remedies(run):
        try:
            changed = runs.load(resolve_values({**base, **change}), run.launch, model=run.model_ref)
        except FtctlError:
            continue
        changed = dataclasses.replace(changed, task=changed.task.bind(state=run.task.state, tokenizer=tokenizer))
        guess = predict(changed, tokenizer, encoded, shape_of(changed, device))
        if needed_mb(guess) <= limit_mb:
            return f"fits with {flags} (needs {needed_mb(guess) / 1024:.1f} GiB)"
    return (
        "no single-GPU setting fits: use more GPUs with DeepSpeed ZeRO-3 (--deepspeed zero3_offload_params_optimizer)"
    )
