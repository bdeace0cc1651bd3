"""What a running grid shows: a live table in a terminal (progress read from each run's events.jsonl), one line per
cell start and end otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from rich.live import Live
from rich.table import Table

from launch.run.console import make_console
from launch.studies.spec import DONE, EXCLUDED, FAILED, INTERRUPTED, PENDING, REFUSED, TRAINED, Cell
from launch.studies.state import View


class Display:
    """A live rich table in a terminal; one line per cell start and end otherwise (logs, CI)."""

    STYLE = {
        DONE: "green",
        FAILED: "red",
        REFUSED: "yellow",
        EXCLUDED: "dim",
        INTERRUPTED: "magenta",
        TRAINED: "cyan",
        PENDING: "",
    }

    def __init__(self, view: Callable[[], View]):
        self.view = view  # the grid as it is now: a snapshot the scheduler makes
        # the terminal as it is now: a cell's evaluation redirects sys.stdout to its log for a while
        self.console = make_console(file=sys.stdout)
        self.live: Any = None

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            self.live = Live(get_renderable=self.table, console=self.console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def _status(self, cell: Cell) -> str:
        if cell.stage == "search":
            return f"searching: trial {cell.step[0]}/{cell.step[1]}" if cell.step else "searching"
        if cell.stage == "train":
            return f"training {cell.step[0]}/{cell.step[1]}" if cell.step else "training (starting)"
        if cell.stage == "evaluate":
            return "evaluating"
        return cell.status

    @staticmethod
    def _metric(cell: Cell) -> str:
        s = cell.summary
        if "after" not in s or s.get("after") is None:
            return ""
        before = f"{s['before']:.4f} -> " if isinstance(s.get("before"), (int, float)) else ""
        return f"{s['metric']} {before}{s['after']:.4f}"

    def table(self) -> Any:
        grid = self.view()
        done = sum(c.status == DONE for c in grid.cells)
        total = sum(c.status not in (REFUSED, EXCLUDED) for c in grid.cells)
        elapsed = time.time() - grid.clock
        table = Table(title=f"grid {grid.name}: {done}/{total} cells done, {elapsed:.0f} s", title_justify="left")
        for column in ("model", "task", "method", "seed", "status", "where", "time", "result"):
            table.add_column(column, overflow="fold")
        for cell in grid.cells:
            style = "bold" if cell.stage else self.STYLE.get(cell.status, "")
            seconds = time.time() - cell.started if cell.stage and cell.started else cell.seconds
            result = self._metric(cell) or (cell.error or "")[:100]
            table.add_row(
                cell.model.label,
                cell.task.label,
                cell.method.label,
                str(cell.seed),
                self._status(cell),
                (cell.where or "") if cell.stage else "",
                f"{seconds:.0f} s" if seconds else "",
                result,
                style=style,
            )
        return table

    def event(self, cell: Cell, what: str) -> None:
        if self.live is not None:
            return
        grid = self.view()
        position, total = grid.cells.index(cell) + 1, len(grid.cells)
        if what == "start":
            where = f" ({cell.where})" if cell.where and grid.running > 1 else ""
            self.console.print(f"[{position}/{total}] {cell.id}: running{where}", markup=False)
        else:
            outcome = self._metric(cell) if cell.status == DONE else (cell.error or cell.status)
            took = f" in {cell.seconds:.0f} s" if cell.seconds else ""
            self.console.print(f"[{position}/{total}] {cell.id}: {cell.status}{took}: {outcome}", markup=False)

    def message(self, text: str) -> None:
        """A line about the grid's progress outside one cell (a search trial): printed unless the live table shows
        the same."""
        if self.live is None:
            self.console.print(text, markup=False)
