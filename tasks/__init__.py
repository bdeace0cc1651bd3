"""Tasks: every task module is imported here, explicitly, and registers itself under its preset names."""

from tasks import (  # noqa: F401
    classification,
    extractive_qa,
    generative_qa,
    instruction_tuning,
    sentence_similarity,
    summarization,
    text_to_text_classification,
    token_classification,
    translation,
)
from tasks.base import TASKS, Preset, Task, register_task

__all__ = ["TASKS", "Preset", "Task", "register_task"]
