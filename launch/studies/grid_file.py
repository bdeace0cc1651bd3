"""The grid file's schema (pydantic): its keys and their types, unknown keys refused with the closest valid one, each
problem in one line as ftctl has always said it. What the values mean is spec.py's."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ftctl.errors import FtctlError, suggest

TOP_KEYS = (
    "name",
    "output_dir",
    "models",
    "tasks",
    "methods",
    "seeds",
    "settings",
    "overrides",
    "exclude",
    "baseline",
    "launcher",
    "search",
)


LAUNCHER_KEYS = ("accelerate_config", "num_processes", "rendezvous_timeout")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Override(_Strict):
    match: dict[str, Any]
    set_: dict[str, Any] = Field(alias="set")


class Launcher(_Strict):
    accelerate_config: str | None = None
    num_processes: int | None = None
    rendezvous_timeout: int | None = None


class Baseline(_Strict):
    """`baseline: {zero_shot: true, few_shot: 4}`: the baselines each (model, task) is scored with."""

    zero_shot: bool = True
    few_shot: int | None = Field(default=None, ge=1)


class GridFile(_Strict):
    """The grid file's shape. Axis entries and option values are checked against the registries and `ftctl train`'s
    options by `load_spec`, with the same messages as `ftctl train --config`."""

    name: str | None = None
    output_dir: str | None = None
    models: list[str | None] | dict[str, Any] | None = None
    tasks: list[Any] | dict[str, Any] | None = None
    methods: list[Any] | dict[str, Any] | None = None
    seeds: list[int] | int = Field(default_factory=lambda: [42])
    settings: dict[str, Any] | None = None
    overrides: list[Override] | None = None
    exclude: list[dict[str, Any]] | None = None
    baseline: bool | Baseline = True
    launcher: Launcher | None = None
    search: str | dict[str, Any] | None = None


MESSAGES = {  # (first field of the error's location) -> what it must be, as ftctl has always said it
    "seeds": "`seeds:` must be a list of integers",
    "overrides": "`overrides:` entries must have `match:` (axis: label(s)) and `set:` (option: value)",
    "exclude": "`exclude:` must be a list of matches (axis: label(s))",
    "baseline": "`baseline:` must be true, false or a mapping {zero_shot: true|false, few_shot: K}",
    "output_dir": "`output_dir:` must be a path",
    "launcher": "launcher: must be a mapping of accelerate_config, num_processes, rendezvous_timeout",
    "settings": "settings: must be a mapping of option: value",
    "name": "`name:` must be a string",
    "search": "`search:` must be `auto` or a mapping of option: [values] (or `learning_rate: auto`), with an optional "
    "`settings:` mapping for the search trials",
}


def schema_error(exc: ValidationError, data: dict[str, Any], where: str) -> FtctlError:
    """One line for the first problem pydantic found: unknown keys get the closest valid key."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    if error["type"] == "extra_forbidden":
        if loc[0] == "launcher":
            key, keys = loc[-1], LAUNCHER_KEYS
            return FtctlError(f"{where}: launcher: unknown key '{key}'{suggest(key, keys)}; keys: {', '.join(keys)}")
        if len(loc) == 1:
            key = loc[0]
            return FtctlError(f"{where}: unknown key '{key}'{suggest(key, TOP_KEYS)}; keys: {', '.join(TOP_KEYS)}")
    what = MESSAGES.get(loc[0], f"`{loc[0]}:` is not valid ({error['msg']})")
    return FtctlError(f"{where}: {what}, got {data.get(loc[0])!r}")
