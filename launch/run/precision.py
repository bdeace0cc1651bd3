"""The precision a run trains in, and the kernels it may use: chosen from the device, the model type and the
launch (`--precision auto`), checked when stated."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ftctl import device
from ftctl.config import RunConfig
from ftctl.errors import FtctlError
from ftctl.facts import LaunchFacts
from ftctl.models import FP16_UNSAFE

if TYPE_CHECKING:  # annotations only
    pass


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), where bf16 autocast is faster
    than fp32; elsewhere bf16 on the CPU is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(launch: LaunchFacts, model_type: str | None = None) -> str:
    """What `--precision auto` means on this machine for this run.

    CUDA: bf16 where the GPU supports it; on GPUs without bf16 (T4, V100) fp16 with loss scaling, except for the
    model types fp16 overflows in (T5: fp32). CPU: bf16 autocast on CPUs with native bf16 and without DeepSpeed,
    measured faster at the same accuracy there (bench/RESULTS.md, perf_cpu: LoRA 1.2x, full fine-tuning 1.3x the fp32
    samples/s on SST-2, equal dev accuracy); fp32 everywhere else. FTCTL_CPU_BF16=0 keeps the CPU at fp32 (the test
    suite does, so that its exact comparisons mean the same on every machine).
    """
    bf16 = device.cuda_bf16()
    if bf16 is not None:
        if bf16:
            return "bf16"
        return "fp32" if model_type in FP16_UNSAFE else "fp16"
    wanted = os.environ.get("FTCTL_CPU_BF16", "1") != "0"
    if wanted and not launch.deepspeed and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def precision_flags(cfg: RunConfig, launch: LaunchFacts, model_type: str | None = None) -> dict[str, bool]:
    bf16 = device.cuda_bf16()
    precision = auto_precision(launch, model_type) if cfg.precision == "auto" else cfg.precision
    if precision == "fp16" and bf16 is None:
        raise FtctlError("--precision fp16 needs a CUDA GPU; on CPU use fp32 or bf16")
    if precision == "bf16" and bf16 is False:
        raise FtctlError("this GPU does not support bf16; use --precision fp16 (what auto picks here) or fp32")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def use_liger(cfg: RunConfig) -> bool:
    """Liger kernels: asked for (then they must be usable), or by default when installed and on CUDA."""
    usable = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if cfg.liger_kernel and not usable:
        raise FtctlError("--liger-kernel needs a CUDA GPU and the liger-kernel package (pip install ftctl[gpu])")
    return usable if cfg.liger_kernel is None else cfg.liger_kernel
