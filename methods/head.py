"""Head only (linear probe): the backbone stays frozen; only the task head (classifier, score, qa_outputs) trains."""

from __future__ import annotations

from typing import TYPE_CHECKING

from methods._matrix import Refusal
from methods.base import Context, Method, freeze_all_but, register_method

if TYPE_CHECKING:  # annotations only
    import torch

    from tasks.base import Task

NO_HEAD = Refusal(
    "the task has no separate head (language-model tasks)",
    lambda cell: not cell.has_head,
    "method '{method}' trains only a task head, and task '{task}' has none (its output layer is the language-model "
    "head, tied to the embeddings); use lora or full",
)


@register_method
class HeadOnly(Method):
    name = "head"
    description = "linear probe: train the task head on a frozen backbone"
    trains = "the task head only"
    defaults = {"*": {"learning_rate": 2e-3, "epochs": 5.0}}
    refusals = (NO_HEAD,)

    def apply(self, model: torch.nn.Module, task: Task, ctx: Context) -> torch.nn.Module:
        freeze_all_but(model, task.head_modules(model))
        return model
