"""Training progress on the main process: a rich progress bar in a terminal, one line per log event otherwise."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from launch.run.console import make_console

if TYPE_CHECKING:  # annotations only
    from transformers import TrainerControl, TrainerState, TrainingArguments

console = make_console()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RichProgress(TrainerCallback):
    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task_id: Any = None
        self.status = ""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
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

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, completed=state.global_step, status=self.status)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
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

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


EVENTS_FILE = "events.jsonl"


class EventLog(TrainerCallback):
    """Training progress as data: one JSON object per line in `RUN_DIR/events.jsonl` (main process), for grids and
    other watchers, so that nothing parses console text. Events: `train_begin` (max_steps), `step` (step,
    max_steps, and loss/learning_rate when logged), `evaluate` (step, metrics), `train_end` (step)."""

    def __init__(self, path: Path):
        self.path = path

    def _write(self, state: TrainerState, event: str, **fields: Any) -> None:
        if not state.is_world_process_zero:
            return
        row = {"event": event, "time": time.time(), "step": state.global_step, "max_steps": state.max_steps, **fields}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._write(state, "train_begin")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self._write(state, "step", loss=logs["loss"], learning_rate=logs.get("learning_rate"))
        elif any(k.startswith("eval_") for k in logs):
            self._write(state, "evaluate", metrics={k[5:]: v for k, v in logs.items() if k.startswith("eval_")})

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step % max(1, args.logging_steps) and state.global_step != state.max_steps:
            self._write(state, "step")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._write(state, "train_end")


def last_event(path: Path, size: int = 4096) -> dict[str, Any] | None:
    """The newest complete event of an events.jsonl file, or None."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written, or cut at the window's start
        if isinstance(event, dict):
            return event
    return None
