"""The compatibility matrix: which method runs on which architecture family and task kind, and why not.

Each method declares the combinations it refuses (`Method.refusals`). This module is the one place that evaluates
them: `check` for a run (called by `Method.check`, before the model is loaded or anything is written) and `table`
for `ftctl list --methods` and the tests. A refusal decided by the family and the task alone (its kind, whether it
has a separate head, its PEFT task type) is a cell of the printed matrix; one that also needs the concrete model
type or the launch (the device, the DeepSpeed stage) is printed as a condition under which the method is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PretrainedConfig

from ftctl.facts import LaunchFacts
from ftctl.vocab import FAMILIES, Family, TaskKind
from tasks import TASKS

if TYPE_CHECKING:  # annotations only: methods.base imports this module to check a run against the matrix
    from methods.base import Context, Method, MethodSpec

SUPPORTED, REFUSED, NOT_A_TASK_FAMILY = "yes", "no", "-"


@dataclass(frozen=True)
class Cell:
    """One combination: an architecture family and a task shape, optionally a concrete model and launch."""

    family: Family
    task_kind: TaskKind
    has_head: bool
    peft_task_type: str
    model_type: str | None = None  # None: any model of the family (a cell of the printed matrix)
    # the launch (device, DeepSpeed stage, ...); only refusals that are not `static` read it, and those are checked
    # for concrete runs only, never for the printed matrix
    launch: LaunchFacts = LaunchFacts()
    task: str = ""  # the task's name, for messages
    model_config: PretrainedConfig | None = None  # for refusals that look at the concrete architecture

    @classmethod
    def of(cls, ctx: Context) -> Cell:
        task = ctx.task
        return cls(
            family=ctx.family,
            task_kind=task.kind,
            has_head=task.has_head,
            peft_task_type=task.fit.peft_task_type,
            model_type=ctx.model_config.model_type,
            launch=ctx.launch,
            task=task.preset_name,
            model_config=ctx.model_config,
        )


@dataclass(frozen=True)
class Refusal:
    """A combination a method cannot run, with the one-line reason (what is wrong and what to do instead).

    `test(cell)` is True (or a non-empty string of detail, available to `reason` as {detail}) when the method must
    refuse. `when` says in a few words when that is, for the printed matrix; `static` refusals depend only on the
    family and the task and fill the matrix's cells, the others need the model or the launch and are listed as
    conditions. `variants` limits a refusal to some registered names of the method (e.g. 8-bit QLoRA).
    """

    when: str
    test: Callable[[Cell], bool | str | None]
    reason: str
    static: bool = True
    variants: tuple[str, ...] = ()

    def applies(self, variant: str, cell: Cell) -> str | None:
        """The refusal message for this cell, or None."""
        if self.variants and variant not in self.variants:
            return None
        found = self.test(cell)
        if not found:
            return None
        detail = found if isinstance(found, str) else ""
        return self.reason.format(
            method=variant,
            task=cell.task or f"a {cell.task_kind} task",
            family=cell.family,
            kind=cell.task_kind,
            model_type=cell.model_type or cell.family,
            detail=detail,
        )


def refusal(method_cls: type[Method], variant: str, cell: Cell) -> str | None:
    """The first reason `variant` of a method class cannot run on `cell`, or None."""
    for rule in method_cls.refusals:
        message = rule.applies(variant, cell)
        if message:
            return message
    return None


@dataclass(frozen=True)
class TaskShape:
    """What the matrix keys on for a task: its kind, whether it has a head, its PEFT task type, its families."""

    kind: TaskKind
    has_head: bool
    peft_task_type: str
    families: tuple[Family, ...]


def registered_shapes() -> list[TaskShape]:
    """One shape per registered task class, in registry order."""
    shapes: dict[type, TaskShape] = {}
    for _, spec in TASKS.items():
        cls = spec.cls
        if cls not in shapes:
            shapes[cls] = TaskShape(cls.kind, cls.has_head, cls.peft_task_type, tuple(cls.families))
    return list(shapes.values())


def row(method_cls: type[Method], variant: str, shape: TaskShape) -> dict[str, str]:
    """family -> yes / no / - (the task does not take that family) for one method and one task shape."""
    out = {}
    for family in FAMILIES:
        if family not in shape.families:
            out[family] = NOT_A_TASK_FAMILY
            continue
        cell = Cell(family, shape.kind, shape.has_head, shape.peft_task_type)
        static = [r for r in method_cls.refusals if r.static]
        refused = any(r.applies(variant, cell) for r in static)
        out[family] = REFUSED if refused else SUPPORTED
    return out


def conditions(method_cls: type[Method], variant: str) -> list[str]:
    """When the method is refused beyond the matrix's cells (model type, device, DeepSpeed)."""
    return [r.when for r in method_cls.refusals if not r.static and (not r.variants or variant in r.variants)]


def table(methods: Iterable[tuple[str, MethodSpec]], shapes: list[TaskShape] | None = None) -> list[dict[str, Any]]:
    """The whole matrix: one entry per registered method name (`METHODS.items()`), with its cells per task kind and
    its conditions."""
    shapes = registered_shapes() if shapes is None else shapes
    rows = []
    for name, spec in methods:
        cells: dict[str, dict[str, str]] = {}
        for shape in shapes:
            for family, verdict in row(spec.cls, name, shape).items():
                previous = cells.setdefault(shape.kind, {}).get(family)
                # two task classes of one kind: a family is supported if either supports it
                if previous != SUPPORTED:
                    cells[shape.kind][family] = verdict
        rows.append(
            {
                "method": name,
                "cells": cells,
                "conditions": conditions(spec.cls, name),
                "mergeable": spec.cls.mergeable,
            }
        )
    return rows
