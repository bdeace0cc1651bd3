"""Methods: every method module is imported here, explicitly, and registers itself by name."""

from methods import adalora, adapter, freeze, full, head, ia3, llrd, lora, soft_prompts  # noqa: F401
from methods.base import METHODS, Context, Method, register_method

__all__ = ["METHODS", "Context", "Method", "register_method"]
