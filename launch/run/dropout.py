"""Dropout for CPU training that spends less time drawing random numbers.

`torch.nn.Dropout` on the CPU draws one value from the Mersenne Twister per element (`bernoulli_`), about 6 ns
per element on the 2-core machine of bench/results/cpu_kernels.md, where swapping it out took a MiniLM LoRA step
from 117.0 to 103.8 ms. `CpuDropout` draws 64 random bits at a time and cuts them into four 16-bit fields, one per
element, and drops an element when its field falls below p * 65536: a Bernoulli mask with the drop rate p
rounded to a multiple of 1/65536 (0.1 becomes 0.100006), kept elements scaled by 65536 / (65536 - p * 65536) so
the expectation is unchanged, drawn from torch's seeded generator (reproducible with the run's seed, resumed
with the checkpoint's RNG state). The backward keeps only the boolean mask, as the stock dropout does. Evaluation
and p = 0 are the identity.

`use_cpu_dropout(model)` swaps it in for every `nn.Dropout` of a model being trained on the CPU; the modules
hold no weights, so nothing saved changes. Dropout inside fused kernels (SDPA's `dropout_p`) is not affected.
"""

from __future__ import annotations

import torch

FIELDS = 1 << 16


class CpuDropout(torch.nn.Dropout):
    """`nn.Dropout` with the mask drawn 16 bits per element (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        threshold = round(self.p * FIELDS)
        if threshold >= FIELDS:
            return torch.zeros_like(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # 64 uniform bits each
        fields = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
        dropped = fields < threshold - FIELDS // 2
        out = x.masked_fill(dropped, 0) * (FIELDS / (FIELDS - threshold))
        return out if not self.inplace else x.copy_(out)


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Replace every plain `nn.Dropout` in `model` with `CpuDropout` (same p); returns how many were replaced."""
    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, CpuDropout(child.p, child.inplace))
                replaced += 1
    return replaced
