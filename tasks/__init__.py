"""Tasks: every task module is imported here, explicitly, and registers itself under its preset names."""

from tasks import classification  # noqa: F401
from tasks.base import TASKS, Preset, Task, register_task

__all__ = ["TASKS", "Preset", "Task", "register_task"]
