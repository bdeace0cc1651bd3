"""What ftctl prints: short rich tables for the run summary and the metrics."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def show_pairs(title: str, pairs: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
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


def show_metrics(title: str, after: dict[str, Any], before: dict[str, Any] | None = None) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("metric", style="bold")
    if before is not None:
        table.add_column("before (base model)", justify="right")
    table.add_column("after (fine-tuned)" if before is not None else "value", justify="right")
    if before is not None:
        table.add_column("delta", justify="right")
    for key, value in scalar_metrics(after).items():
        if before is None:
            table.add_row(key, fmt(value))
        else:
            base = before.get(key)
            delta = f"{value - base:+.4f}" if isinstance(base, (int, float)) else ""
            table.add_row(key, fmt(base), fmt(value), delta)
    console.print(table)
