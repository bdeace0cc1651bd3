"""The device rate that turns a step's FLOPs into seconds: measured here (a matrix product in the training dtype)
or stated (`--tflops`)."""

from __future__ import annotations

import time

import torch

from launch.run import runs
from launch.run.planning.prediction import Shape


def measured_rate(device: str, precision: str, tokens: int, hidden: int, inner: int, seconds: float = 0.3) -> float:
    """TFLOP/s of the run's own typical matrix product (its micro-batch's tokens x hidden size, times the hidden x
    feed-forward weight) in the training dtype on this machine's device, one process: small models on short batches
    reach a small fraction of a device's peak, and this sees it."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(max(tokens, 1), hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, inner, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm up (and wait for the device)
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        c = a @ b
        done += 1
    c.sum().item()
    return 2 * a.shape[0] * hidden * inner * done / (time.perf_counter() - began) / 1e12


def device_rate(run: runs.Run, shape: Shape, tokens: int, stated: float | None) -> tuple[float | None, str]:
    if stated:
        return stated, "stated (--tflops)"
    if shape.device != run.launch.device:
        return None, f"not measured: planning for {shape.device} on a {run.launch.device} machine; give --tflops"
    config = run.model_config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 768)
    inner = int(getattr(config, "intermediate_size", 0) or getattr(config, "d_ff", 0) or 4 * hidden)
    rate = measured_rate(shape.device, shape.precision, tokens, hidden, inner)
    return rate, f"measured here: {shape.precision} product of the micro-batch's tokens x {hidden} x {inner}"
