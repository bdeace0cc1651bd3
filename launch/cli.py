"""`ftctl`: the command-line front door. Import-light (no torch, no transformers) so `ftctl --help` is instant.

`ftctl train` and `ftctl evaluate` hand their arguments to the same parsers and `main` functions as
`python -m launch.train` and `python -m launch.evaluate`, so every entry point takes the same options.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="ftctl",
    help="Fine-tune transformer backbones on NLP tasks with any standard method, and score the results.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)

FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _forward(main, args: list[str]) -> int:
    from launch.errors import run_main

    try:
        return run_main(main, args)
    except SystemExit as exc:  # argparse exits after printing --help
        return int(exc.code or 0)


@app.command(context_settings=FORWARD, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Fine-tune a model on a task with a method. All options: [bold]ftctl train --help[/]."""
    from functools import partial

    from launch.train import main

    raise typer.Exit(_forward(partial(main, prog="ftctl train"), ctx.args))


@app.command(context_settings=FORWARD, add_help_option=False)
def evaluate(ctx: typer.Context) -> None:
    """Score a fine-tuned run directory or checkpoint. All options: [bold]ftctl evaluate --help[/]."""
    from launch.evaluate import main

    raise typer.Exit(_forward(main, ctx.args))


@app.command("list")
def list_(
    tasks: bool = typer.Option(False, "--tasks", help="only tasks"),
    methods: bool = typer.Option(False, "--methods", help="only methods"),
) -> None:
    """What ftctl can do: tasks with their presets and metrics, methods with what they train."""
    from rich.console import Console
    from rich.table import Table

    import methods as method_registry
    import tasks as task_registry

    console = Console()
    show_all = not (tasks or methods)
    if tasks or show_all:
        table = Table(title="tasks", title_justify="left")
        table.add_column("preset", no_wrap=True, style="bold")
        for column in ("task", "families", "metrics", "data"):
            table.add_column(column, overflow="fold")
        for name, spec in task_registry.TASKS.items():
            preset = spec.preset
            data = preset.description
            if preset.hub:
                data += f" [dim](hub: {preset.hub[0]})[/]"
            table.add_row(name, spec.cls.name, " ".join(spec.cls.families), " ".join(spec.cls.metrics), data)
        console.print(table)
    if methods or show_all:
        table = Table(title="methods", title_justify="left")
        table.add_column("method", no_wrap=True, style="bold")
        for column in ("trains", "options", "what it is"):
            table.add_column(column, overflow="fold")
        for name, spec in method_registry.METHODS.items():
            options = " ".join(s.flag for s in spec.option_specs())
            table.add_row(name, spec.cls.trains, options, spec.cls.description)
        console.print(table)


if __name__ == "__main__":
    app()
