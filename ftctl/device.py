"""What the accelerator can do, read in one place: precision choices and QLoRA's compute dtype follow it, and the
tests stand in for a GPU by replacing this function."""

from __future__ import annotations

import torch


def cuda_bf16() -> bool | None:
    """Whether the CUDA GPU computes in bf16 (Ampere and newer: A100, H100, RTX 30xx+); False on older ones (T4,
    V100: the GPUs of free notebooks); None without a CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    return bool(torch.cuda.is_bf16_supported())
