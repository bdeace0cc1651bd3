"""What ftctl prints: short rich tables for the run summary and the metrics."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from tasks._metrics import COUNT_METRICS

# Written to a file or a pipe (a log, CI), rich would wrap every table at 80 columns: there a line is as wide as its
# content, up to this, and a table row stays one line
LOG_WIDTH = 400


def make_console(file: TextIO | None = None, stderr: bool = False, log_width: int = LOG_WIDTH) -> Console:
    """A console that wraps only on a terminal; elsewhere lines are as wide as their content, up to `log_width`."""
    return Console(file=file, stderr=stderr, highlight=False, width=None if on_terminal(file, stderr) else log_width)


def on_terminal(file: TextIO | None = None, stderr: bool = False) -> bool:
    stream = file or (sys.stderr if stderr else sys.stdout)
    return hasattr(stream, "isatty") and stream.isatty()


console = make_console()


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_metric(name: str, value: Any) -> str:
    if name in COUNT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:,.0f}"
    return fmt(value)


def show_pairs(title: str, pairs: list[tuple[str, Any]]) -> None:
    console.print(title, style="italic", markup=False)  # not the table's title: rich wraps that to the table's width
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in pairs:
        table.add_row(key, fmt(value))
    console.print(table)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(skip)
    }


def show_metrics(title: str, after: dict[str, Any], before: dict[str, dict[str, Any]] | None = None) -> None:
    """The metrics, beside each baseline (`before`: column name -> metrics, e.g. zero-shot and 4-shot) and the change
    from the first of them."""
    before = before or {}
    console.print(title, style="italic", markup=False)  # not the table's title: rich wraps that to the table's width
    table = Table()
    table.add_column("metric", style="bold")
    for name in before:
        table.add_column(name, justify="right")
    table.add_column("fine-tuned" if before else "value", justify="right")
    if before:
        table.add_column(f"delta vs {next(iter(before))}", justify="right")
    first = next(iter(before.values()), None)
    for key, value in scalar_metrics(after).items():
        cells = [fmt_metric(key, b.get(key)) for b in before.values()] + [fmt_metric(key, value)]
        if first is not None:
            base = first.get(key)
            if not isinstance(base, (int, float)):
                cells.append("")
            else:
                cells.append(f"{value - base:+,.0f}" if key in COUNT_METRICS else f"{value - base:+.4f}")
        table.add_row(key, *cells)
    console.print(table)
