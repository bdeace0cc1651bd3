"""Head only (linear probe): the backbone stays frozen; only the task head (classifier, score, qa_outputs) trains."""

from __future__ import annotations

from typing import Any

from methods.base import Context, Method, freeze_all_but, register_method, require_head


@register_method
class HeadOnly(Method):
    name = "head"
    description = "linear probe: train the task head on a frozen backbone"
    trains = "the task head only"
    defaults = {"*": {"learning_rate": 2e-3, "epochs": 5.0}}

    def check(self, ctx: Context) -> None:
        require_head(ctx.task, self.variant)

    def apply(self, model: Any, task: Any, ctx: Context) -> Any:
        freeze_all_but(model, task.head_modules(model))
        return model
