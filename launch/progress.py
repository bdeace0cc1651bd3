"""Training progress on the main process: a rich progress bar in a terminal, one line per log event otherwise."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

console = Console(stderr=False, highlight=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RichProgress(TrainerCallback):
    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task_id: Any = None
        self.status = ""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=True,
        )
        self.progress.start()
        self.task_id = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, completed=state.global_step, status=self.status)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.status = f"epoch {state.epoch:.2f}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}"
            if self.progress is None:
                console.print(f"step {state.global_step}/{state.max_steps}  {self.status}")
        elif any(k.startswith("eval_") for k in logs):
            shown = {
                k[5:]: v
                for k, v in logs.items()
                if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))
            }
            console.print(f"eval @ step {state.global_step}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
