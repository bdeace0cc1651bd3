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
    from ftctl.errors import run_main

    try:
        return run_main(main, args)
    except SystemExit as exc:  # argparse exits after printing --help
        return int(exc.code or 0)


@app.command(context_settings=FORWARD, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Fine-tune a model on a task with a method. All options: [bold]ftctl train --help[/]."""
    raise typer.Exit(_forward(_train, ctx.args))


def _train(argv: list[str]) -> None:
    """Run training here, or through accelerate's launcher when launcher options are given."""
    from launch.run import launcher
    from launch.train import main

    if any(a in ("-h", "--help") for a in argv):
        print(launcher.launcher_help())
    options, rest = launcher.split(argv)
    if launcher.wants_launcher(options):
        code = launcher.launch(options, rest)
        if code:
            raise SystemExit(code)  # the training processes already said why
        return
    main(rest, prog="ftctl train")


@app.command(context_settings=FORWARD, add_help_option=False)
def evaluate(ctx: typer.Context) -> None:
    """Score a fine-tuned run directory or checkpoint. All options: [bold]ftctl evaluate --help[/]."""
    from launch.evaluate import main

    raise typer.Exit(_forward(main, ctx.args))


@app.command(context_settings=FORWARD, add_help_option=False)
def predict(ctx: typer.Context) -> None:
    """Run a fine-tuned model on new, unlabelled inputs. All options: [bold]ftctl predict --help[/]."""
    from launch.predict import main

    raise typer.Exit(_forward(main, ctx.args))


@app.command(context_settings=FORWARD, add_help_option=False)
def generate(ctx: typer.Context) -> None:
    """Have a generative run answer prompts. All options: [bold]ftctl generate --help[/]."""
    from launch.predict import generate as main

    raise typer.Exit(_forward(main, ctx.args))


@app.command(context_settings=FORWARD, add_help_option=False)
def merge(ctx: typer.Context) -> None:
    """Fold a run's LoRA-family adapter into its base model. All options: [bold]ftctl merge --help[/]."""
    from launch.merge import main

    raise typer.Exit(_forward(main, ctx.args))


FAMILY_SHORT = {"encoder": "enc", "decoder": "dec", "encoder-decoder": "enc-dec"}


@app.command("list")
def list_(
    tasks: bool = typer.Option(False, "--tasks", help="only tasks"),
    methods: bool = typer.Option(False, "--methods", help="only methods"),
) -> None:
    """What ftctl can do: tasks with their presets and metrics, methods with what they train and the compatibility
    matrix (which architecture families each method runs on, per task kind)."""
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
            table.add_row(name, spec.trains, options, spec.description)
        console.print(table)

        from methods import matrix

        rows = matrix.table(method_registry.METHODS.items())
        kinds = list(rows[0]["cells"]) if rows else []
        table = Table(
            title="compatibility: architecture families per task kind (x = refused, with the reason, before "
            "anything is loaded)",
            title_justify="left",
        )
        table.add_column("method", no_wrap=True, style="bold")
        for kind in kinds:
            table.add_column(kind, overflow="fold")
        table.add_column("also refused with", overflow="fold")
        table.add_column("merge", no_wrap=True)
        marks = {matrix.SUPPORTED: "[green]✓[/]", matrix.REFUSED: "[red]x[/]"}
        for row in rows:
            cells = [
                " ".join(
                    f"{marks[verdict]} {FAMILY_SHORT[family]}"
                    for family, verdict in row["cells"][kind].items()
                    if verdict != matrix.NOT_A_TASK_FAMILY
                )
                for kind in kinds
            ]
            merge = "✓" if row["mergeable"] else "-"
            table.add_row(row["method"], *cells, "; ".join(row["conditions"]) or "-", merge)
        console.print(table)


@app.command(context_settings=FORWARD, add_help_option=False)
def plan(ctx: typer.Context) -> None:
    """Predict peak memory and time of a run (train options) or of every cell of a grid (GRID.yaml), before
    anything is loaded; --gpu-memory 16GiB says what fits."""
    raise typer.Exit(_forward(_plan, ctx.args))


def _plan(argv: list[str]) -> None:
    if argv and not argv[0].startswith("-"):  # `ftctl plan GRID.yaml [options]` (a path or a shipped recipe)
        from launch.studies.grid import plan_main

        plan_main(argv)
        return
    from launch.plan import main

    main(argv)


@app.command(context_settings=FORWARD, add_help_option=False)
def grid(ctx: typer.Context) -> None:
    """Run a comparison grid from a YAML file; re-run it to resume. All options: [bold]ftctl grid --help[/]."""
    from launch.studies.grid import main

    raise typer.Exit(_forward(main, ctx.args))


@app.command(context_settings=FORWARD, add_help_option=False)
def report(ctx: typer.Context) -> None:
    """Compare finished runs or a grid: tables and plots. All options: [bold]ftctl report --help[/]."""
    from launch.studies.report import main

    raise typer.Exit(_forward(main, ctx.args))


if __name__ == "__main__":
    app()
