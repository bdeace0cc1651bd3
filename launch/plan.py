"""`ftctl plan` / `python -m launch.plan`: the predicted peak memory and time of a run (train options) in a table,
with what fits a stated GPU (`--gpu-memory`); the planner itself is launch/run/planning/."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from ftctl.errors import FtctlError
from ftctl.options import Parser
from launch.run import rundir, runs
from launch.run.arguments import total_steps
from launch.run.console import console
from launch.run.planning.fit import CUDA_CONTEXT_MB, FRAGMENTATION, needed_mb, parse_size, suggestion
from launch.run.planning.predict import predict, shape_of
from launch.run.planning.prediction import Prediction
from launch.run.quiet import quiet, quiet_transformers


def prepared(run: runs.Run) -> tuple[runs.Run, Any, Any, int]:
    """The run bound to its tokenizer and training data as training binds it, its tokenized training split (from
    the same cache training reads) and the optimizer steps it will take."""
    run, tokenizer, _, encoded = runs.with_data(run, ("train",))
    return (
        run,
        tokenizer,
        encoded["train"],
        total_steps(run.cfg, run.launch.num_processes, len(encoded["train"])),
    )


SHORT = {"weights": "weights", "gradients": "grads", "optimizer": "optim", "activations": "activ"}


def row(label: str, prediction: Prediction, limit_mb: float | None, advice: str = "") -> dict[str, Any]:
    """One line of the plan table (and of `ftctl plan --json`); memory in MiB per process."""
    shape = prediction.shape
    seconds = prediction.train_seconds
    fits = None if limit_mb is None else needed_mb(prediction) <= limit_mb
    out: dict[str, Any] = {
        "run": label,
        "batch": f"{shape.micro_batch}x{shape.accumulation}x{shape.processes}",
        "tokens": shape.length,
        **{SHORT.get(k, k): round(v, 1) for k, v in prediction.parts.items()},
        "peak": round(prediction.peak_mb, 1),
        "time": "-" if seconds is None else time.strftime("%H:%M:%S", time.gmtime(seconds)),
    }
    if fits is not None:
        out.update(fits="yes" if fits else "no", advice=advice)
    return {**out, "prediction": prediction.record()}


def show(rows: list[dict[str, Any]], limit_mb: float | None) -> None:
    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "prediction"]
    console.print("ftctl plan: peak memory per process (MiB) and training time, predicted", style="italic")
    table = Table()
    for column in columns:
        no_wrap = column not in ("run", "advice")  # numbers and times never break: `00:00…` said nothing
        table.add_column(column, justify="left" if column in ("run", "advice", "batch") else "right", no_wrap=no_wrap)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in columns))
    console.print(table)
    console.print("batch: micro-batch x accumulation x processes; tokens: the longest batch's length", markup=False)
    if limit_mb is not None:
        console.print(
            f"fits: peak x {FRAGMENTATION} (allocator margin) + {CUDA_CONTEXT_MB:.0f} MiB (CUDA context) <= "
            f"{limit_mb / 1024:.1f} GiB",
            markup=False,
        )


def plan_options(prog: str) -> Any:
    parser = Parser(prog=prog, add_help=False)
    parser.add_argument("--gpu-memory", metavar="SIZE", help="GPU memory per process (16GiB): which runs fit")
    parser.add_argument("--tflops", type=float, metavar="X", help="device rate per process (default: measured here)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="plan for this device (default: this machine's)")
    parser.add_argument("--json", metavar="FILE", help="also write the predictions to FILE")
    return parser


def checked(opts: dict[str, Any]) -> dict[str, Any]:
    """The plan options checked, with `limit_mb` (from --gpu-memory, or None) for what follows."""
    if opts["tflops"] is not None and opts["tflops"] <= 0:
        raise FtctlError(f"--tflops must be positive, got {opts['tflops']}")
    if opts["json"] and not Path(opts["json"]).resolve().parent.is_dir():
        raise FtctlError(f"--json {opts['json']}: its folder does not exist; create it or give another path")
    return {**opts, "limit_mb": parse_size(opts["gpu_memory"]) if opts["gpu_memory"] else None}


def plan_run(run: runs.Run, label: str, opts: dict[str, Any]) -> dict[str, Any]:
    """One run's table row: its prediction, whether it fits `--gpu-memory`, and if not, what would."""
    run, tokenizer, encoded, steps = prepared(run)
    limit = opts["limit_mb"]
    device = opts["device"] or ("cuda" if limit is not None else run.launch.device)
    try:
        prediction = predict(run, tokenizer, encoded, shape_of(run, device), steps, opts["tflops"])
    except Exception as exc:  # noqa: BLE001  an operation fake tensors cannot run (a data-dependent check)
        return {"run": label, "advice": f"not predicted: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    advice = ""
    if limit is not None and needed_mb(prediction) > limit:
        advice = suggestion(run, tokenizer, encoded, limit, device)
    return row(label, prediction, limit, advice)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """`ftctl plan [train options]`: one run's predicted peak memory and time; nothing is loaded but configs,
    tokenizer and data."""
    quiet()
    quiet_transformers()
    argv = list(sys.argv[1:] if argv is None else argv)
    known, rest = plan_options("ftctl plan").parse_known_args(argv)
    opts = checked(vars(known))
    run = runs.from_argv(rest, "ftctl plan")
    rows = [plan_run(run, f"{run.cfg.task} / {run.method.variant}", opts)]
    finish(rows, opts)
    return rows


def finish(rows: list[dict[str, Any]], opts: dict[str, Any]) -> None:
    show(rows, opts["limit_mb"])
    if opts["json"]:
        rundir.write_json(Path(opts["json"]), rows)


if __name__ == "__main__":
    main()
