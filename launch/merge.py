"""Merge a run's adapter into its base model: `ftctl merge RUN_DIR --output DIR` (or `python -m launch.merge`).

LoRA-family results (lora, rslora, dora, adalora, ia3, qlora, qlora8) are folded into the weights they modify. The
output is a plain transformers model directory (config, safetensors weights, tokenizer, `merge.json`) that loads
with `AutoModelFor*.from_pretrained` alone and gives the fine-tuned model's outputs within float tolerance. A
quantized base (qlora, qlora8) is merged into its de-quantized weights, in full precision, and the command says so.
Soft prompts and bottleneck adapters are not weights that can be folded in, and full-weight methods already saved
a full model: those are refused before anything is loaded.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftctl.errors import FtctlError, run_main
from ftctl.models import load_kwargs
from ftctl.options import Parser
from launch.run import rundir, runs
from launch.run.console import console
from launch.run.quiet import quiet, quiet_transformers
from launch.run.runs import check_weights, locate

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MERGE_FILE = "merge.json"


def build_parser() -> Parser:
    parser = Parser(
        prog="ftctl merge",
        description="Fold a run's LoRA-family adapter into its base model and save the result as a plain "
        "transformers model.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or a checkpoint-N directory inside one)")
    parser.add_argument("--output", metavar="DIR", required=True, help="directory to write the merged model to")
    parser.add_argument("--model", help="base model (default: the one in the adapter config)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it holds an earlier merge")
    return parser


def check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FtctlError(f"--output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FtctlError(f"--output {path} already exists and is not empty; pass --overwrite or another --output")
        if not (path / MERGE_FILE).is_file():
            raise FtctlError(f"--overwrite refused: {path} does not hold an earlier merge (no {MERGE_FILE})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Merge a run's adapter into its base and save the plain transformers model."""
    quiet()
    opts = build_parser().parse_strict(list(sys.argv[1:] if argv is None else argv))
    weights, spec = locate(opts["run_dir"])
    run = runs.from_saved(weights, spec, opts["model"])
    if not run.method.mergeable:
        raise FtctlError(f"method '{run.method.variant}' has nothing to merge: {run.method.merge_refusal}")
    output = Path(opts["output"])
    check_output(output, opts["overwrite"])
    check_weights(weights, run.method.is_peft)

    quiet_transformers()
    run, tokenizer = runs.with_saved_tokenizer(run, weights)
    task = run.task
    try:
        model, notes = run.method.merge(task, str(weights), run.model_ref, tokenizer, load_kwargs(run.cfg))
    except (OSError, ValueError, RuntimeError) as exc:
        raise FtctlError(f"cannot merge {weights}: {str(exc).splitlines()[0]}") from None

    info = {
        "run_dir": str(Path(opts["run_dir"]).resolve()),
        "method": run.method.variant,
        "base_model": run.model_ref,
        "auto_model": task.fit.auto_model,
        "load_args": task.load_args(run.model_config),
        "notes": notes,
        "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_merged(model, tokenizer, info, output)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(
        f"[green]merged[/] the {run.method.variant} adapter with its base ({run.model_ref}) into {output}; the base "
        "is unchanged\n"
        f"load it: transformers.{task.fit.auto_model}.from_pretrained({str(output)!r})"
    )
    return info


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, info: dict[str, Any], output: Path) -> None:
    """Write the merged model next to `output`, then move it into place."""
    staging = output.with_name(output.name + ".merge.tmp")
    earlier = output.with_name(output.name + ".merge.old")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        rundir.write_json(staging / MERGE_FILE, info)
    except BaseException:  # Ctrl-C, SIGTERM, a full disk: no half-written copy is left beside the output
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():  # an earlier merge (--overwrite): kept until the new one is in place
        output.rename(earlier)
    staging.rename(output)
    shutil.rmtree(earlier, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
