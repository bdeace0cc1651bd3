"""The grid file: its schema (grid_file.py), its axes, option layers and
exclusions, and the cells it expands to. Reads no model or data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ftctl.config import DATA, RUN_SPECS
from ftctl.errors import FtctlError, suggest
from ftctl.models import resolve_model
from ftctl.options import coerce
from launch.run.config import all_specs, load_yaml
from launch.studies.grid_file import MESSAGES, GridFile, schema_error
from methods import METHODS
from tasks import TASKS

AXES = ("model", "task", "method", "seed")


# options the grid sets for each cell itself
MANAGED = ("task", "method", "model", "seed", "output_dir", "overwrite", "resume", "resume_from", "config")


SAFE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# cell states, as written to grid.json
PENDING, DONE, TRAINED, FAILED, REFUSED, EXCLUDED, INTERRUPTED = (
    "pending",
    "done",
    "trained",
    "failed",
    "refused",
    "excluded",
    "interrupted",
)


FINAL = (DONE, REFUSED, EXCLUDED)


# ---- the grid file ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AxisValue:
    """One value of an axis: its label (in cell names and reports), what it names, and the options it brings."""

    label: str
    name: Any  # task or method name, model reference (None: the embedded model), or seed
    options: dict[str, Any]


@dataclasses.dataclass
class Layer:
    """Options from one place of the grid file, applied to the cells `match` selects."""

    where: str
    options: dict[str, Any]
    match: dict[str, list[str]]
    used: set[str] = dataclasses.field(default_factory=set)  # options that applied to at least one cell


@dataclasses.dataclass
class GridSpec:
    path: Path
    name: str
    output_dir: str | None
    models: list[AxisValue]
    tasks: list[AxisValue]
    methods: list[AxisValue]
    seeds: list[AxisValue]
    layers: list[Layer]  # settings, then each axis value's options, then overrides, in the order they apply
    exclude: list[dict[str, list[str]]]
    baseline: bool  # score the zero-shot (or untrained-head) baseline once per (model, task, evaluation data)
    launcher: dict[str, Any]
    # options searched per (model, task, method) before the final runs: option -> values, or "auto" (learning rate:
    # a range around the cell's default); `search_settings` are options for the search trials only
    search: dict[str, Any] = dataclasses.field(default_factory=dict)
    search_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    few_shot: int | None = None  # and the K-shot baseline of prompted tasks beside it


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FtctlError(f"{where} must be a mapping of option: value, got {type(value).__name__} {value!r}")
    return value


def _options(raw: Any, where: str, specs: dict[str, Any]) -> dict[str, Any]:
    """Option values from the grid file, checked and converted like a `--config` file's keys."""
    out: dict[str, Any] = {}
    for key, value in _mapping(raw, where).items():
        name = str(key).replace("-", "_")
        if name in MANAGED:
            hint = {"seed": "list seeds under `seeds:`", "output_dir": "the grid gives each cell its own directory"}
            raise FtctlError(
                f"{where}: '{key}' is set by the grid for each cell "
                f"({hint.get(name, 'name it as an axis: models, tasks, methods')}); remove it"
            )
        if name not in specs:
            raise FtctlError(f"{where}: unknown option '{key}'{suggest(name, specs)}; keys are `ftctl train` options")
        value = coerce(specs[name], value, f"{where}: '{key}'")
        if name.endswith("_file") and value is not None:
            path = Path(value).expanduser()
            if not path.is_file():
                raise FtctlError(f"{where}: {key} {value} not found (relative paths are from the current directory)")
            value = str(path.resolve())
        out[name] = value
    return out


def _model_label(ref: str | None) -> str:
    if not ref:
        return "minilm"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(ref).rstrip("/")).name) or "model"


def _axis(data: dict[str, Any], key: str, specs: dict[str, Any], path: str) -> list[AxisValue]:
    """An axis as a list of names or a mapping label -> options (with `task:`/`method:`/`model:` to name what the
    label stands for when it differs from it, e.g. `lora_r4: {method: lora, lora_r: 4}`)."""

    kind = key[:-1]  # models -> model
    raw = data.get(key)
    if raw is None:
        if key == "models":
            return [AxisValue("minilm", None, {})]
        raise FtctlError(f"{path}: no `{key}:` given; list at least one (see `ftctl list`)")
    entries: list[tuple[str | None, Any]]
    if isinstance(raw, list):
        entries = [(None, item) for item in raw]
    elif isinstance(raw, dict):
        entries = list(raw.items())
    else:
        raise FtctlError(f"{path}: `{key}:` must be a list or a mapping, got {type(raw).__name__}")
    if not entries:
        raise FtctlError(f"{path}: `{key}:` is empty")
    values: list[AxisValue] = []
    for label, item in entries:
        where = f"{path}: {key}" + (f".{label}" if label is not None else "")
        options: dict[str, Any] = {}
        if label is None:  # a list item: a name (or a model reference)
            if key != "models" and not isinstance(item, str):
                raise FtctlError(f"{where}: list items must be {kind} names, got {item!r}")
            if key == "models" and item is not None and not isinstance(item, str):
                raise FtctlError(f"{where}: list items must be model ids or directories, got {item!r}")
            name = item
            label = _model_label(item) if key == "models" else item
        else:
            label = str(label)
            if key == "models" and (item is None or isinstance(item, str)):
                name, item = item, {}
            else:
                item = dict(_mapping(item, where))
                name = item.pop(kind, label if key != "models" else None)
            options = _options(item, where, specs)
        if not SAFE_LABEL.match(label):
            raise FtctlError(f"{where}: label '{label}' names a directory: use letters, digits, '.', '_' or '-'")
        try:
            if key == "tasks":
                TASKS.get(name)  # unknown names are errors with the close matches
            elif key == "methods":
                METHODS.get(name)
            elif name:
                name = resolve_model(str(name))  # local directories become absolute, hub ids stay
        except FtctlError as exc:
            raise FtctlError(f"{where}: {exc}") from None
        if any(v.label == label for v in values):
            raise FtctlError(f"{where}: label '{label}' appears twice; give each {kind} its own label in a mapping")
        values.append(AxisValue(label, name, options))
    return values


def _match(raw: Any, where: str, spec_axes: dict[str, list[AxisValue]]) -> dict[str, list[str]]:
    raw = _mapping(raw, where)
    if not raw:
        raise FtctlError(f"{where} is empty; name at least one of {', '.join(AXES)}")
    out: dict[str, list[str]] = {}
    for key, value in raw.items():
        if key not in AXES:
            raise FtctlError(f"{where}: unknown axis '{key}'{suggest(str(key), AXES)}; axes: {', '.join(AXES)}")
        wanted = [str(v) for v in (value if isinstance(value, list) else [value])]
        labels = [v.label for v in spec_axes[key]]
        for label in wanted:
            if label not in labels:
                raise FtctlError(
                    f"{where}: {key} '{label}' is not in the grid{suggest(label, labels)}; {key}s: {', '.join(labels)}"
                )
        out[key] = wanted
    return out


def load_spec(path: str) -> GridSpec:
    """Read and check a grid file. Raises FtctlError for anything wrong in it; reads no model or data."""
    data = load_yaml(path, "grid file", "keys (name, models, tasks, methods, ...)")
    where = Path(path).name
    try:
        parsed = GridFile.model_validate(data)
    except ValidationError as exc:
        raise schema_error(exc, data, where) from None
    specs = all_specs()
    seeds = parsed.seeds if isinstance(parsed.seeds, list) else [parsed.seeds]
    if not seeds:
        raise FtctlError(f"{where}: `seeds:` must be a list of integers, got {data.get('seeds')!r}")
    if len(set(seeds)) != len(seeds):
        raise FtctlError(f"{where}: `seeds:` lists a seed twice")
    axes = {
        "model": _axis(data, "models", specs, where),
        "task": _axis(data, "tasks", specs, where),
        "method": _axis(data, "methods", specs, where),
        "seed": [AxisValue(str(s), s, {}) for s in seeds],
    }
    layers = [Layer(f"{where}: settings", _options(parsed.settings, f"{where}: settings", specs), {})]
    for axis in ("model", "task", "method"):
        for value in axes[axis]:
            if value.options:
                layers.append(Layer(f"{where}: {axis}s.{value.label}", value.options, {axis: [value.label]}))
    for i, override in enumerate(parsed.overrides or []):
        at = f"{where}: overrides[{i}]"
        layers.append(
            Layer(at, _options(override.set_, f"{at}.set", specs), _match(override.match, f"{at}.match", axes))
        )
    exclude = [_match(item, f"{where}: exclude[{i}]", axes) for i, item in enumerate(parsed.exclude or [])]
    search, search_settings = _search(parsed.search, f"{where}: search", specs)
    launcher = parsed.launcher.model_dump(exclude_none=True) if parsed.launcher else {}
    return GridSpec(
        path=Path(path),
        name=str(parsed.name or Path(path).stem),
        output_dir=parsed.output_dir,
        models=axes["model"],
        tasks=axes["task"],
        methods=axes["method"],
        seeds=axes["seed"],
        layers=layers,
        exclude=exclude,
        baseline=parsed.baseline if isinstance(parsed.baseline, bool) else parsed.baseline.zero_shot,
        few_shot=None if isinstance(parsed.baseline, bool) else parsed.baseline.few_shot,
        launcher=launcher,
        search=search,
        search_settings=search_settings,
    )


SEARCHABLE_AUTO = ("learning_rate",)  # options `auto` knows a range for


def _search(raw: Any, where: str, specs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`search: auto` or `search: {option: [values] | auto, ..., settings: {...}}`, checked like any option."""
    if raw is None:
        return {}, {}
    if raw == "auto":
        return {"learning_rate": "auto"}, {}
    if not isinstance(raw, dict) or not raw:
        raise FtctlError(f"{where}: {MESSAGES['search']}, got {raw!r}")
    raw = dict(raw)
    settings = _options(raw.pop("settings", None), f"{where}.settings", specs)
    space: dict[str, Any] = {}
    for key, values in raw.items():
        name = str(key).replace("-", "_")
        at = f"{where}.{key}"
        if values == "auto":
            if name not in SEARCHABLE_AUTO:
                raise FtctlError(f"{at}: `auto` knows a range for {', '.join(SEARCHABLE_AUTO)} only; list the values")
            space[name] = "auto"
            continue
        if not isinstance(values, list) or not values:
            raise FtctlError(f"{at}: give a list of values to try (or `auto` for the learning rate), got {values!r}")
        if any(isinstance(v, (list, dict)) for v in values):
            raise FtctlError(f"{at}: each value tried must be a single value (a number, a word), got {values!r}")
        checked = [_options({key: v}, at, specs)[name] for v in values]
        if len({json.dumps(v, default=str) for v in checked}) != len(checked):
            raise FtctlError(f"{at}: a value is listed twice")
        space[name] = checked
    if not space:
        raise FtctlError(f"{where}: name at least one option to search, e.g. `learning_rate: auto`")
    return space, settings


# ---- cells -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cell:
    id: str
    model: AxisValue
    task: AxisValue
    method: AxisValue
    seed: int
    values: dict[str, Any]  # the cell's options: its config file
    baseline_key: str
    status: str = PENDING
    error: str | None = None
    stage: str | None = None  # train or evaluate, while running
    attempts: int = 0
    started: float | None = None  # time.time() of the current attempt
    seconds: float | None = None
    resume: bool = False  # continue from the checkpoint in its directory (else start it again)
    where: str | None = None  # where it ran last: its GPUs, its CPU threads, or Ray
    step: tuple[int, int] | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    search_key: str | None = None  # cells sharing it share one search (all seeds of a model, task and method)
    search_space: dict[str, Any] = dataclasses.field(default_factory=dict)  # the searched options that apply
    searched: dict[str, Any] = dataclasses.field(default_factory=dict)  # the values the search chose

    def labels(self) -> dict[str, Any]:
        return {"model": self.model.label, "task": self.task.label, "method": self.method.label, "seed": self.seed}


def _selected(match: dict[str, list[str]], labels: dict[str, Any]) -> bool:
    return all(str(labels[axis]) in wanted for axis, wanted in match.items())


def _data_key(values: dict[str, Any], task_option_names: set[str]) -> str:
    """What decides a cell's evaluation data: cells sharing it share one baseline. Without validation or test
    files the validation data is a seeded split of the training data, so the seed is part of it."""

    names = {s.name for s in RUN_SPECS if s.group == DATA} | task_option_names
    if not (values.get("validation_file") or values.get("test_file")):
        names.add("seed")
    return json.dumps({k: values.get(k) for k in sorted(names)}, sort_keys=True, default=str)


def expand(spec: GridSpec) -> list[Cell]:
    """The grid's cells in order (model, task, method, seed), with the options each one gets.

    An option applies to the cells it can apply to (a run option to all, a task or method option to the cells of
    that task or method); one that applies to none of the cells it selects is an error, with where it belongs.
    """

    run_names = {s.name for s in RUN_SPECS}
    cells = []
    searched_options: set[str] = set()
    for model in spec.models:
        for task in spec.tasks:
            task_spec = TASKS.get(task.name)
            task_names = {s.name for s in task_spec.option_specs()}
            for method in spec.methods:
                method_names = {s.name for s in METHODS.get(method.name).option_specs()}
                for seed in spec.seeds:
                    labels = {"model": model.label, "task": task.label, "method": method.label, "seed": seed.label}
                    values: dict[str, Any] = {
                        "task": task.name,
                        "method": method.name,
                        "model": model.name,
                        "seed": seed.name,
                    }
                    for layer in spec.layers:
                        if not _selected(layer.match, labels):
                            continue
                        for key, value in layer.options.items():
                            if key in run_names or key in task_names or key in method_names:
                                values[key] = value
                                layer.used.add(key)
                    cell_id = f"{model.label}__{task.label}__{method.label}__seed{seed.name}"
                    data = _data_key(values, task_names)
                    key = f"{model.label}__{task.label}__{hashlib.sha1(data.encode()).hexdigest()[:8]}"
                    cell = Cell(cell_id, model, task, method, seed.name, values, key)
                    if any(_selected(m, labels) for m in spec.exclude):
                        cell.status = EXCLUDED
                    applies = run_names | task_names | method_names
                    cell.search_space = {k: v for k, v in spec.search.items() if k in applies}
                    if cell.search_space:
                        cell.search_key = f"{model.label}__{task.label}__{method.label}"
                        searched_options.update(cell.search_space)
                    cells.append(cell)
    unsearched = [k for k in spec.search if k not in searched_options]
    if unsearched:
        raise FtctlError(f"{spec.path.name}: search: '{unsearched[0]}' is an option of none of the grid's cells")
    for layer in spec.layers:
        unused = [k for k in layer.options if k not in layer.used]
        if unused:
            name = unused[0]
            owners = [f"method {n}" for n, m in METHODS.items() if name in {o.name for o in m.option_specs()}]
            owners += [f"task {n}" for n, t in TASKS.items() if name in {o.name for o in t.option_specs()}]
            raise FtctlError(
                f"{layer.where}: '{name}' applies to none of the cells it selects; it is an option of "
                f"{', '.join(owners[:6])}{' ...' if len(owners) > 6 else ''}"
            )
    return cells
