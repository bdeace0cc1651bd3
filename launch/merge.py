"""Merge a run's adapter into its base model: `ftctl merge RUN_DIR --output DIR` (or `python -m launch.merge`).

LoRA-family results (lora, rslora, dora, adalora, ia3, qlora, qlora8) are folded into the weights they modify. The
output is a plain transformers model directory (config, safetensors weights, tokenizer, `merge.json`) that loads
with `AutoModelFor*.from_pretrained` alone and gives the fine-tuned model's outputs within float tolerance. A
quantized base (qlora, qlora8) is merged into its de-quantized weights, in full precision, and the command says so.
Soft prompts and bottleneck adapters are not weights that can be folded in, and full-weight methods already saved
a full model: those are refused before anything is loaded.

The merged model is then checked against the run (launch/run/parity.py): both score the run's evaluation examples
(or `--data FILE`), `parity.json` beside the model records their agreement, and more than `--max-disagreement`
percent of examples predicted differently fails the command (exit 1). `ftctl export --format merged` writes the
same model (and takes full-weight runs too).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ftctl.errors import FtctlError, run_main
from ftctl.options import Parser
from launch.run import exporting, parity, runs
from launch.run.arguments import check_world, training_arguments
from launch.run.cache import encode_cached
from launch.run.console import console
from launch.run.quiet import quiet, quiet_transformers
from launch.run.runs import check_weights, locate
from launch.run.scoring import evaluation_data

MERGE_FILE = "merge.json"


def build_parser() -> Parser:
    parser = Parser(
        prog="ftctl merge",
        description="Fold a run's LoRA-family adapter into its base model and save the result as a plain "
        "transformers model, checked to predict what the run does.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or a checkpoint-N directory inside one)")
    parser.add_argument("--output", metavar="DIR", required=True, help="directory to write the merged model to")
    parser.add_argument("--model", help="base model (default: the one in the adapter config)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it holds an earlier merge")
    parity.add_options(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Merge a run's adapter into its base, save the plain transformers model, and check its parity."""
    quiet()
    opts = build_parser().parse_strict(list(sys.argv[1:] if argv is None else argv))
    parity.check_threshold(opts["max_disagreement"])
    weights, spec = locate(opts["run_dir"])
    run = runs.from_saved(weights, spec, opts["model"], **({"max_eval_samples": None} if opts["data"] else {}))
    if not run.method.mergeable:
        raise FtctlError(f"method '{run.method.variant}' has nothing to merge: {run.method.merge_refusal}")
    output = Path(opts["output"])
    exporting.check_output(output, opts["overwrite"], MERGE_FILE, "an earlier merge")
    check_weights(weights, run.method.is_peft)
    raw, source = evaluation_data(run, opts["data"], None)

    quiet_transformers()
    run, tokenizer = runs.with_saved_tokenizer(run, weights)
    encoded = encode_cached(run.task, raw, tokenizer, run.cfg.token_cache)
    info = {
        "run_dir": str(Path(opts["run_dir"]).resolve()),
        "method": run.method.variant,
        "base_model": run.model_ref,
        "auto_model": run.task.fit.auto_model,
        "load_args": run.task.load_args(run.model_config),
        "parity_data": source,
        "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with tempfile.TemporaryDirectory(prefix="ftctl-merge-") as scratch:
        args = training_arguments(parity.scoring_config(run.cfg), run.task, scratch, run.launch)
        check_world(args)
        written, record = exporting.export_run(
            run,
            weights,
            tokenizer,
            "merged",
            output,
            (args, raw, encoded),
            opts["max_disagreement"],
            (MERGE_FILE, info),
        )
    for note in written["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    console.print(
        f"[green]merged[/] the {run.method.variant} adapter with its base ({run.model_ref}) into {output}; the base "
        "is unchanged\n"
        f"load it: transformers.{run.task.fit.auto_model}.from_pretrained({str(output)!r})"
    )
    console.print(parity.summary(record))
    parity.enforce(record, "the merged model", str(output / parity.PARITY_FILE))
    return written


if __name__ == "__main__":
    sys.exit(run_main(main))
