"""What a report reads of a task: its evaluation details as drawable views (DetailView) and its prediction rows
through a declared RowView. A helper module of tasks/base.py (re-exported there), not a task."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DetailView:
    """A non-scalar result drawn the same way whatever task it comes from: `matrix` (labels x labels counts, e.g. a
    confusion matrix) or `bars` (a value per named item, e.g. F1 per entity type). Tasks turn their evaluation
    details into these (`ReportsDetails`), so the report never names a task's detail keys."""

    kind: str  # matrix or bars
    title: str
    labels: list[str]
    values: Any  # matrix: list of rows of counts; bars: list of values, one per label
    value_name: str = ""


@dataclass(frozen=True)
class RowView:
    """How a report reads a task's prediction rows (`predictions.jsonl`): which field says whether a prediction is
    right (a bool, or a score where 1 means right: exact match), which fields are its input (the first one a row
    has is shown) and which its gold answer. A task with none of these declares no `correct` field and gets no
    fixed/broken examples, rather than guessed ones."""

    correct: str | None = None
    inputs: tuple[str, ...] = ()
    gold: str | None = None

    def is_correct(self, row: Mapping[str, Any]) -> bool | None:
        value = row.get(self.correct) if self.correct else None
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return value >= 1
        return None

    def shown(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """An example as a reader wants to see it: its input (at most 300 characters), gold answer, prediction."""
        text = next((row[k] for k in self.inputs if k in row), "")
        text = " ".join(map(str, text)) if isinstance(text, list) else str(text)
        gold = row.get(self.gold) if self.gold else None
        return {"index": row.get("index"), "input": text[:300], "gold": gold, "prediction": row.get("prediction")}
