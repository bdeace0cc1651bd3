"""The run configuration and how it is resolved.

Layering, lowest first: option defaults, the task's defaults, the method's defaults for that task, the preset's
values (dataset columns, ...), the `--config` YAML file, then command-line flags. Explicit `null` in YAML resets a
value to "decide automatically". The resolved values are written to the run directory (`run.json` and
`config.yaml`), and `--config <run>/config.yaml` repeats the run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftctl.config import RUN_SPECS, RunConfig, with_aliases
from ftctl.errors import FtctlError, suggest, warn
from ftctl.options import OptionSpec, Parser, add_options, coerce, merge_specs
from methods import METHODS
from methods.base import Method
from tasks import TASKS
from tasks.base import Task


@dataclass
class Resolved:
    """Everything a run is made of, resolved and checked."""

    cfg: RunConfig
    task: Task
    method: Method
    explicit: list[str]  # option names the user set (file or flags)

    def flat(self) -> dict[str, Any]:
        """All option values, as one flat mapping with the same keys as the command-line options."""
        out = dataclasses.asdict(self.cfg)
        out.update(dataclasses.asdict(self.task.opts))
        out.update(dataclasses.asdict(self.method.opts))
        return out


def all_specs() -> dict[str, OptionSpec]:
    """Every option of the run, of every registered task and of every registered method."""
    return merge_specs(
        RUN_SPECS,
        *(spec.option_specs() for _, spec in TASKS.items()),
        *(spec.option_specs() for _, spec in METHODS.items()),
    )


def build_parser(prog: str) -> Parser:
    parser = Parser(
        prog=prog,
        description="Fine-tune a transformer on a task with a method. Every option can also be a key in --config FILE.",
        epilog="Options of one task or method apply only when that task or method is chosen. Defaults marked "
        "'per task and method' are the general ones; the chosen task kind and method may set their own (e.g. LoRA on "
        "classification trains 5 epochs at 1e-3), and run.json records every value used.",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are these options; flags win")
    add_options(parser, all_specs().values(), tuned=tuned_defaults())
    return parser


def tuned_defaults() -> set[str]:
    """The options some task or method sets its own default for (`defaults` of task and method classes)."""
    tuned = {name for _, spec in TASKS.items() for name in spec.cls.defaults}
    for _, method in METHODS.items():
        tuned |= {name for per_kind in method.cls.defaults.values() for name in per_kind}
        for variant in method.cls.variants.values():
            tuned |= {name for per_kind in variant.get("defaults", {}).values() for name in per_kind}
    return tuned


def load_yaml(path: str, what: str = "config file", holds: str = "option: value") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FtctlError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise FtctlError(f"{what} {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FtctlError(f"{what} {path} must be a mapping of {holds}, got a {type(data).__name__}")
    return data


def _user_values(argv: list[str], prog: str) -> tuple[dict[str, Any], dict[str, OptionSpec]]:
    specs = all_specs()
    cli = build_parser(prog).parse_strict(argv)
    values: dict[str, Any] = {}
    config_path = cli.pop("config", None)
    if config_path:
        loaded = load_yaml(config_path)
        if not loaded:
            warn(f"config file {config_path} is empty; every option has its default")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in specs:
                raise FtctlError(
                    f"unknown key '{key}' in {config_path}{suggest(name, specs)}; keys are the option names"
                )
            if value is None and specs[name].default is None:
                continue  # `max_length:` with nothing after it: the default, as if the line were not there
            values[name] = coerce(specs[name], value, f"key '{key}' in {config_path}")
    values.update(cli)
    return values, specs


def resolve(argv: list[str], prog: str) -> Resolved:
    """Parse the command line (and --config file) into a checked run description."""
    user, specs = _user_values(argv, prog)
    return resolve_values(user, specs)


def stored_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The options a run directory recorded (`run.json`, `spec.json`), as this version of ftctl knows them: an option
    an older ftctl had and this one has not is left out, with a warning, instead of failing the whole load."""
    specs = all_specs()
    unknown = sorted(k for k in config if k not in specs)
    if unknown:
        warn(f"{where} records option(s) this ftctl does not have ({', '.join(unknown)}); they are ignored")
    return {k: v for k, v in config.items() if k in specs}


def resolve_values(user: dict[str, Any], specs: dict[str, OptionSpec] | None = None) -> Resolved:
    """Resolve explicit option values (as from a YAML file or `run.json`) with every default layer."""
    specs = specs or all_specs()
    unknown = sorted(k for k in user if k not in specs)
    if unknown:
        raise FtctlError(f"unknown option '{unknown[0]}'{suggest(unknown[0], specs)}")
    task_name = user.get("task")
    if not task_name:
        raise FtctlError(f"no task given: pass --task NAME; tasks: {', '.join(TASKS)}")
    task_spec = TASKS.get(task_name)
    method_spec = METHODS.get(user.get("method") or RunConfig.method)

    task_names = {s.name for s in task_spec.option_specs()}
    method_names = {s.name for s in method_spec.option_specs()}
    run_names = {s.name for s in RUN_SPECS}
    for name in user:
        if name not in run_names | task_names | method_names:
            owners = [n for n, s in METHODS.items() if name in {o.name for o in s.option_specs()}]
            owners += [n for n, s in TASKS.items() if name in {o.name for o in s.option_specs()}]
            raise FtctlError(
                f"{specs[name].flag} does not apply to task '{task_name}' with method "
                f"'{user.get('method') or RunConfig.method}'; it belongs to: {', '.join(owners)}"
            )

    # a method's defaults for the task kind may set run options (learning rate, epochs) and its own options
    method_defaults = method_spec.run_defaults(task_spec.kind)
    values = {s.name: s.default for s in RUN_SPECS}
    values.update(task_spec.run_defaults())
    values.update({k: v for k, v in method_defaults.items() if k in run_names})
    values.update({k: v for k, v in user.items() if k in run_names})
    if user.get("eval_steps") and "eval_strategy" not in user:  # --eval-steps N alone means: evaluate every N steps
        values["eval_strategy"] = "steps"
        if "save_strategy" not in user and "save_steps" not in user:  # and keep the best of them
            values["save_strategy"], values["save_steps"] = "steps", user["eval_steps"]
    cfg = RunConfig(**with_aliases(values))

    task = task_spec.create(cfg, {k: v for k, v in user.items() if k in task_names})
    method_values = {k: v for k, v in method_defaults.items() if k in method_names}
    method_values.update({k: v for k, v in user.items() if k in method_names})
    method = method_spec.create(method_values)
    return Resolved(cfg=cfg, task=task, method=method, explicit=sorted(user))


def default_output_dir(cfg: RunConfig) -> str:
    return os.path.join("runs", f"{cfg.task}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
