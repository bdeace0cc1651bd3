"""`ftctl`: the command-line front door. Import-light (no torch, no transformers) so `ftctl --help` is instant.

Every command hands its arguments to the argparse parser and `main` function of its front door (`ftctl train` to
`launch.train.main`, the same one `python -m launch.train` and `accelerate launch -m launch.train` run), so every
entry point takes the same options and prints the same messages. This file only dispatches: argparse is the one CLI
framework (options are declared once, as dataclass fields, in ftctl/options.py; click-based parsers cannot take
several values after one flag, as `--target-modules q_proj v_proj` does).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed

PROG = "ftctl"
SUMMARY = "Fine-tune transformer backbones on NLP tasks with any standard method, and score the results."


def _train(argv: list[str]) -> None:
    """Run training here, or through accelerate's launcher when launcher options are given."""
    # import-light CLI: the run layer only once a command runs
    from launch.run import launcher
    from launch.train import main

    options, rest = launcher.split(argv)
    if any(a in ("-h", "--help") for a in argv):  # usage and the training options first, then the launcher's
        try:
            main(rest, prog="ftctl train")
        finally:
            print(launcher.launcher_help())
    if launcher.wants_launcher(options):
        code = launcher.launch(options, rest)
        if code:
            raise SystemExit(code)  # the training processes already said why
        return
    main(rest, prog="ftctl train")


def _plan(argv: list[str]) -> None:
    if argv and not argv[0].startswith("-"):  # `ftctl plan GRID.yaml [options]` (a path or a shipped recipe)
        from launch.studies.grid import plan_main  # import-light CLI

        plan_main(argv)
        return
    from launch.plan import main  # import-light CLI

    main(argv)


def _entry(target: str) -> Callable[[list[str]], object]:
    """`module:function`, imported only when its command runs."""

    def run(argv: list[str]) -> object:
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)(argv)

    return run


COMMANDS: dict[str, tuple[str, Callable[[list[str]], object]]] = {
    "train": ("Fine-tune a model on a task with a method.", _train),
    "evaluate": ("Score a fine-tuned run directory or checkpoint.", _entry("launch.evaluate:main")),
    "predict": ("Run a fine-tuned model on new, unlabelled inputs.", _entry("launch.predict:main")),
    "generate": ("Have a generative run answer prompts.", _entry("launch.predict:generate")),
    "merge": ("Fold a run's LoRA-family adapter into its base model.", _entry("launch.merge:main")),
    "export": (
        "Export a run as merged weights, ONNX or GGUF, checked to predict what the run does.",
        _entry("launch.export:main"),
    ),
    "list": ("What ftctl can do: tasks, presets, methods and which combinations run.", _entry("launch.catalogue:main")),
    "plan": (
        "Predict peak memory and time of a run (train options) or of every cell of a grid (GRID.yaml), before "
        "anything is loaded; --gpu-memory 16GiB says what fits.",
        _plan,
    ),
    "grid": ("Run a comparison grid from a YAML file; re-run it to resume.", _entry("launch.studies.grid:main")),
    "report": ("Compare finished runs or a grid: tables and plots.", _entry("launch.studies.report:main")),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [OPTIONS]", "", SUMMARY, "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (help_, _) in COMMANDS.items()]
    lines += ["", f"All options of a command: {PROG} COMMAND --help"]
    return "\n".join(lines)


def version() -> str:
    try:
        return installed("ftctl")
    except PackageNotFoundError:  # a checkout run with PYTHONPATH, not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Dispatch `ftctl COMMAND ...`; the exit code (2 for bad input, with one `error:` line)."""
    from ftctl.errors import run_main  # light: the kernel's error type, no torch

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"{PROG} {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"error: unknown command {name!r}; the commands are {', '.join(COMMANDS)} ({PROG} --help)", file=sys.stderr
        )
        return 2
    try:
        return run_main(COMMANDS[name][1], rest)
    except SystemExit as exc:  # argparse exits after --help (0) or a bad option (2)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1


def app() -> None:
    """The `ftctl` console script."""
    raise SystemExit(main())


if __name__ == "__main__":
    app()
