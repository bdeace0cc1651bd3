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


def show_metrics(title: str, after: dict[str, Any], before: dict[str, dict[str, Any]] | None = None) -> None:
    """The metrics, beside each baseline (`before`: column name -> metrics, e.g. zero-shot and 4-shot) and the change
    from the first of them."""
    before = before or {}
    table = Table(title=title, title_justify="left")
    table.add_column("metric", style="bold")
    for name in before:
        table.add_column(name, justify="right")
    table.add_column("fine-tuned" if before else "value", justify="right")
    if before:
        table.add_column(f"delta vs {next(iter(before))}", justify="right")
    first = next(iter(before.values()), None)
    for key, value in scalar_metrics(after).items():
        cells = [fmt(b.get(key)) for b in before.values()] + [fmt(value)]
        if first is not None:
            base = first.get(key)
            cells.append(f"{value - base:+.4f}" if isinstance(base, (int, float)) else "")
        table.add_row(key, *cells)
    console.print(table)
