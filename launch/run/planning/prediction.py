"""What the planner predicts for one process: the shape it computes and the memory and time that follow."""

from __future__ import annotations

import dataclasses
from typing import Any

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Shape:
    """What one process computes per micro-step."""

    micro_batch: int
    accumulation: int
    processes: int
    precision: str  # fp32, bf16 or fp16 (autocast)
    device: str  # the device the run trains on: cpu or cuda
    length: int = 0  # the longest training batch's sequence length (tokens per row), set by `predict`


@dataclasses.dataclass
class Prediction:
    """Per process, in MiB; `parts` sum to `peak_mb`."""

    shape: Shape
    parts: dict[str, float]
    peak_mb: float
    offloaded_mb: float  # held in CPU memory by DeepSpeed offload, not on the device
    trainable: int
    frozen: int
    quantized: int  # parameters stored in 4 or 8 bits
    logits_mb: float  # the largest logits tensor of the step (informational: part of activations)
    flops_per_step: float  # one optimizer step, all processes
    tokens_per_step: int
    steps: int | None
    rate_tflops: float | None  # per process
    rate_source: str
    notes: list[str]

    @property
    def step_seconds(self) -> float | None:
        if not self.rate_tflops:
            return None
        return self.flops_per_step / self.shape.processes / (self.rate_tflops * 1e12)

    @property
    def train_seconds(self) -> float | None:
        if self.step_seconds is None or self.steps is None:
            return None
        return self.step_seconds * self.steps

    def record(self) -> dict[str, Any]:
        """What run.json and grid.json keep."""
        return {
            "peak_memory_mb": round(self.peak_mb, 1),
            "parts_mb": {k: round(v, 1) for k, v in self.parts.items()},
            "offloaded_mb": round(self.offloaded_mb, 1),
            "logits_mb": round(self.logits_mb, 1),
            "parameters": {"trainable": self.trainable, "frozen": self.frozen, "quantized": self.quantized},
            "shape": dataclasses.asdict(self.shape),
            "flops_per_step": self.flops_per_step,
            "tokens_per_step": self.tokens_per_step,
            "steps": self.steps,
            "rate_tflops": self.rate_tflops,
            "rate_source": self.rate_source,
            "step_seconds": self.step_seconds,
            "train_seconds": self.train_seconds,
            "notes": self.notes,
        }
