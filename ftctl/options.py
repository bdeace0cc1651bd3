"""Options: each setting is declared once, as a dataclass field, and serves the YAML loader, the command line,
`--help` and `run.json` alike.

The general run options live in `ftctl.config.RunConfig`; each task and method declares its own options in its
module (e.g. `--lora-r` in `methods/lora.py`), so adding one never touches launch code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Collection, Iterable
from typing import Any

from ftctl.errors import FtctlError, suggest

_SCALAR_KINDS = (bool, int, float, str)


def option(default: Any = None, help: str = "", *, choices: Iterable[str] | None = None, group: str | None = None):
    """A dataclass field carrying what the parsers need. Lists get a fresh copy per instance."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "group": group}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    name: str
    kind: type  # bool, int, float, str or list (of str)
    default: Any
    help: str
    choices: tuple[str, ...] | None
    group: str
    owner: str  # who declares it, for messages: "run", "task classification", "method lora"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _kind(annotation: Any) -> type:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"option type {annotation} is not supported")
        annotation = args[0]
    if annotation is list or typing.get_origin(annotation) is list:
        return list
    if annotation in _SCALAR_KINDS:
        return annotation
    raise TypeError(f"option type {annotation} is not supported")


def specs_of(cls: type, owner: str, group: str) -> list[OptionSpec]:
    """The options a config dataclass declares."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"option {cls.__name__}.{f.name} needs a default")
        specs.append(
            OptionSpec(
                name=f.name,
                kind=_kind(hints[f.name]),
                default=default,
                help=f.metadata.get("help", ""),
                choices=f.metadata.get("choices"),
                group=f.metadata.get("group") or group,
                owner=owner,
            )
        )
    return specs


def _number(kind: type, text: str, where: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise FtctlError(f"{where} must be {noun}, got '{text}'") from None
    return _finite(value, where)


def _item(text: str, where: str) -> str:
    """One value of a list option: `--target-modules ""` named no module, and peft found nothing to adapt."""
    if not text.strip():
        raise FtctlError(f"{where} has an empty value; give names, or leave the option out for the default")
    return text


def _finite(value: int | float, where: str) -> int | float:
    """`nan` and `inf` parse as floats; no option means them (an --epochs nan run trained, an inf rate diverged)."""
    if not math.isfinite(value):
        raise FtctlError(f"{where} must be a finite number, got {value!r}")
    return value


def coerce(spec: OptionSpec, value: Any, where: str) -> Any:
    """Check and convert a value read from a YAML file or run.json to the option's type."""
    if value is None:
        if spec.default is not None:  # `learning_rate:` with nothing after it: YAML reads null
            raise FtctlError(f"{where} has no value; give one, or remove it for the default ({spec.default!r})")
        return None
    kind = spec.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise FtctlError(f"{where} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise FtctlError(f"{where} must be a number, got {value!r}")
        if isinstance(value, str):  # YAML 1.1 reads `5e-4` as a string
            value = _number(kind, value.strip(), where)
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise FtctlError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        if not isinstance(value, (int, float)):
            raise FtctlError(f"{where} must be a number, got {value!r}")
        value = _finite(kind(value), where)
    elif kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise FtctlError(f"{where} must be a string, got {value!r}")
        value = str(value)
    elif kind is list:
        items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(items, list) or not all(isinstance(x, (str, int, float)) for x in items):
            raise FtctlError(f"{where} must be a string or a list of strings, got {value!r}")
        value = [_item(str(x), where) for x in items]
    if spec.choices and kind is not list and value not in spec.choices:
        raise FtctlError(
            f"{where} must be one of {', '.join(spec.choices)}; got {value!r}{suggest(str(value), spec.choices)}"
        )
    return value


class Parser(argparse.ArgumentParser):
    """argparse that reports problems as one FtctlError line instead of usage text and `sys.exit`."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise FtctlError(f"{message} (see {self.prog} --help)")

    def parse_strict(self, argv: list[str]) -> dict[str, Any]:
        """Parse, turning an unknown flag into an error with the closest valid flag."""
        namespace, unknown = self.parse_known_args(argv)
        if unknown:
            first = unknown[0]
            if first.startswith("-"):
                flag = first.split("=", 1)[0]
                known = [s for a in self._actions for s in a.option_strings]
                raise FtctlError(f"unknown option {flag}{suggest(flag, known)} (see {self.prog} --help)")
            raise FtctlError(f"unexpected argument '{first}' (see {self.prog} --help)")
        return vars(namespace)


def add_options(parser: argparse.ArgumentParser, specs: Iterable[OptionSpec], tuned: Collection[str] = ()) -> None:
    """One flag per option; defaults are suppressed so the result holds only what the user typed. Options in
    `tuned` have defaults some task or method replaces: their help says so."""
    groups: dict[str, Any] = {}
    for spec in specs:
        group = groups.get(spec.group) or groups.setdefault(spec.group, parser.add_argument_group(spec.group))
        help_text = spec.help
        # `is`, not `in`: 0 == False, and a default of 0 is worth showing
        shown = not (spec.default is None or spec.default is False or spec.default == [])
        if shown and "default" not in help_text:
            help_text += f" (default: {spec.default}{'; per task and method' if spec.name in tuned else ''})"
        elif spec.name in tuned:
            help_text += " (default: per task and method)"
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text}
        if spec.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.kind is list:
            kwargs.update(
                nargs="+", action="extend", metavar=spec.name.upper(), type=lambda t, f=spec.flag: _item(t, f)
            )
        else:
            kind = spec.kind
            kwargs["type"] = (lambda text, k=kind, f=spec.flag: _number(k, text, f)) if kind in (int, float) else str
            kwargs["metavar"] = spec.name.upper() if not spec.choices else "{" + ",".join(spec.choices) + "}"
            if spec.choices:
                kwargs["choices"] = spec.choices
        group.add_argument(spec.flag, **kwargs)


def merge_specs(*spec_lists: Iterable[OptionSpec]) -> dict[str, OptionSpec]:
    """Options by name. Two modules may declare the same option only with the same type (e.g. LoRA variants)."""
    merged: dict[str, OptionSpec] = {}
    for specs in spec_lists:
        for spec in specs:
            seen = merged.get(spec.name)
            if seen is None:
                merged[spec.name] = spec
            elif seen.kind is not spec.kind:
                raise TypeError(
                    f"option '{spec.name}' is declared by {seen.owner} and {spec.owner} with different types"
                )
    return merged
