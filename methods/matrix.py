"""The compatibility matrix: which method runs on which architecture family and task kind, and why not.

Each method declares the combinations it refuses (`Method.refusals`). This module is the one place that evaluates
them: `check` for a run (called by `Method.check`, before the model is loaded or anything is written) and `table`
for `ftctl list --methods` and the tests. A refusal decided by the family and the task alone (its kind, whether it
has a separate head, its PEFT task type) is a cell of the printed matrix; one that also needs the concrete model
type or the launch (the device, the DeepSpeed stage) is printed as a condition under which the method is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from launch.errors import FtctlError

if TYPE_CHECKING:
    from methods.base import Context, Method

FAMILIES = ("encoder", "decoder", "encoder-decoder")
SUPPORTED, REFUSED, NOT_A_TASK_FAMILY = "yes", "no", "-"


@dataclass(frozen=True)
class Cell:
    """One combination: an architecture family and a task shape, optionally a concrete model and launch."""

    family: str
    task_kind: str
    has_head: bool
    peft_task_type: str
    model_type: str | None = None  # None: any model of the family (a cell of the printed matrix)
    facts: Mapping[str, Any] = field(default_factory=dict)  # launch facts (device, deepspeed_stage, ...)
    task: str = ""  # the task's name, for messages
    model_config: Any = None  # the model's config, for refusals that look at the concrete architecture

    @classmethod
    def of(cls, ctx: Context) -> Cell:
        task = ctx.task
        return cls(
            family=ctx.family,
            task_kind=task.kind,
            has_head=task.has_head,
            peft_task_type=task.peft_task_type,
            model_type=ctx.model_config.model_type,
            facts={**ctx.facts, **deepspeed_facts(ctx.cfg)},
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


def deepspeed_facts(cfg: Any) -> dict[str, Any]:
    """Whether the run's DeepSpeed config (--deepspeed) brings its own optimizer, which replaces our parameter
    groups."""
    ref = getattr(cfg, "deepspeed", None)
    if not ref:
        return {}
    import json

    from launch.engine import deepspeed_config

    path = deepspeed_config(ref)
    config = json.loads(open(path, encoding="utf-8").read()) if path else {}
    return {"deepspeed_optimizer": "optimizer" in config}


def refusal(method_cls: type[Method], variant: str, cell: Cell) -> str | None:
    """The first reason `variant` cannot run on `cell`, or None."""
    for rule in method_cls.refusals:
        message = rule.applies(variant, cell)
        if message:
            return message
    return None


def check(method: Method, ctx: Context) -> None:
    """Raise the method's refusal of this run's combination, if any."""
    message = refusal(type(method), method.variant, Cell.of(ctx))
    if message:
        raise FtctlError(message)


@dataclass(frozen=True)
class TaskShape:
    """What the matrix keys on for a task: its kind, whether it has a head, its PEFT task type, its families."""

    kind: str
    has_head: bool
    peft_task_type: str
    families: tuple[str, ...]


def registered_shapes() -> list[TaskShape]:
    """One shape per registered task class, in registry order."""
    from tasks import TASKS

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


def table(shapes: list[TaskShape] | None = None) -> list[dict[str, Any]]:
    """The whole matrix: one entry per registered method name, with its cells per task kind and its conditions."""
    from methods.base import METHODS

    shapes = registered_shapes() if shapes is None else shapes
    rows = []
    for name, spec in METHODS.items():
        cells: dict[str, dict[str, str]] = {}
        for shape in shapes:
            for family, verdict in row(spec.cls, name, shape).items():
                previous = cells.setdefault(shape.kind, {}).get(family)
                # two task classes of one kind: a family is supported if either supports it
                if previous != SUPPORTED:
                    cells[shape.kind][family] = verdict
        rows.append(
            {"method": name, "cells": cells, "conditions": conditions(spec.cls, name), "mergeable": spec.cls.mergeable}
        )
    return rows
