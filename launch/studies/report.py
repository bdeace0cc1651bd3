"""Comparison reports: `ftctl report DIR...` and `python -m launch.studies.report DIR...` run `main`.

Reads finished run directories (a grid directory, a folder of runs, or run directories named one by one) and writes
`report.md` (and `report.html` with `--format html`), `report.json` with the same numbers for machines, and PNG
plots. Every number is taken as is from the runs' `run.json` (training cost, history) and `eval.json` (the metric
after fine-tuning and the zero-shot baseline before it); the report formats them and computes only the deltas and
the summaries of per-example scores.

The zero-shot baseline of a run is its own `eval.json` baseline (`ftctl evaluate --baseline`), else the one its
grid scored for the same model and task, else that of another run in the report with the same base model, task and
evaluation data.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ftctl.errors import FtctlError
from ftctl.options import Parser
from launch.run import rundir
from launch.run.console import make_console
from launch.run.quiet import quiet
from launch.studies.collect import assemble, collect
from launch.studies.plots import plot_task
from launch.studies.render import html, markdown

REPORT_FILES = ("report.md", "report.json", "report.html")


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FtctlError(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FtctlError(
                f"report directory {out} already exists; pass --overwrite to replace it or choose another --output"
            )
        if not (out / "report.json").is_file():
            raise FtctlError(
                f"--overwrite refused: {out} is not a report directory (no report.json), so ftctl will "
                "not delete it; choose another --output"
            )
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK):
        raise FtctlError(f"cannot write to {out}: {ancestor} is not writable")


def build(
    paths: list[str],
    out: Path,
    overwrite: bool = False,
    fmt: str = "md",
    title: str | None = None,
    min_effect: float | None = None,
) -> dict:
    """Read the runs, then write the report into `out` (staged next to it, then moved in). Returns report.json."""
    _check_output(out, overwrite)
    found = collect(paths)
    default = "ftctl report: " + (", ".join(found.grids) if found.grids else f"{len(found.runs)} runs")
    report = assemble(found, title or default, min_effect)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        for task in report["tasks"]:
            task["plots"] = plot_task(task, staging)
        (staging / "report.md").write_text(markdown(report), encoding="utf-8")
        if fmt == "html":
            (staging / "report.html").write_text(html(report, staging), encoding="utf-8")
        rundir.write_json(staging / "report.json", report)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report


def build_parser() -> Any:
    parser = Parser(
        prog="ftctl report",
        description="Compare finished runs: per task a table of training cost and metrics before/after "
        "fine-tuning, loss curves, bar charts, confusion matrices, per-entity F1 and per-example score "
        "distributions. Writes report.md, report.json and PNG plots.",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="DIR", help="a grid directory, a folder of run directories, or run directories"
    )
    parser.add_argument("--output", metavar="DIR", help="where to write the report (default: DIR/report for one DIR)")
    parser.add_argument(
        "--format", choices=("md", "html"), default="md", help="md: report.md (default); html: report.html as well"
    )
    parser.add_argument("--title", help="the report's title")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    parser.add_argument(
        "--min-effect",
        type=float,
        metavar="DELTA",
        help="the smallest difference in the main metric worth finding: the seeds-needed column plans for it "
        "(default: each comparison's observed difference)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_strict(argv)
    if opts["output"]:
        out = Path(opts["output"])
    elif len(opts["paths"]) == 1:
        out = Path(opts["paths"][0]) / "report"
    else:
        raise FtctlError("several directories given: say where the report goes with --output DIR")
    effect = opts["min_effect"]
    if effect is not None and not (math.isfinite(effect) and effect > 0):
        raise FtctlError(f"--min-effect must be a positive difference in the main metric, got {effect}")
    report = build(opts["paths"], out, opts["overwrite"], opts["format"], opts["title"], effect)

    shown = "report.html" if opts["format"] == "html" else "report.md"
    make_console().print(
        f"wrote {out / shown} ({report['runs']} runs, {len(report['tasks'])} tasks, "
        f"{sum(len(t['plots']) for t in report['tasks'])} plots)",
        markup=False,
    )
    return report


if __name__ == "__main__":
    from ftctl.errors import run_main

    sys.exit(run_main(main))
