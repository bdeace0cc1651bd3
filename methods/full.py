"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from typing import Any

from methods.base import Context, Method, register_method


@register_method
class Full(Method):
    name = "full"
    trains_backbone = True
    description = "full fine-tuning: update every parameter"
    trains = "all parameters"
    defaults = {"*": {"learning_rate": 5e-5}}

    def apply(self, model: Any, task: Any, ctx: Context) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
