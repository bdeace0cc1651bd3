"""Export a run as a standalone model and prove it predicts what the run does: `ftctl export RUN --format
merged|onnx|gguf --output DIR` (or `python -m launch.export`).

The formats are in launch/run/exporting.py, the parity check in launch/run/parity.py: the exported model, loaded as
its users load it (transformers, ONNX Runtime), and the trained run score the run's own evaluation examples (or
`--data FILE`); `parity.json` records their agreement, the metric of both with the interval of the difference, and
the largest logit difference. More than `--max-disagreement` percent of examples predicted differently fails the
command (exit 1), naming them.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ftctl.errors import run_main
from ftctl.options import Parser
from launch.run import exporting, parity, runs
from launch.run.arguments import check_world, training_arguments
from launch.run.cache import encode_cached
from launch.run.console import console
from launch.run.quiet import quiet, quiet_transformers
from launch.run.scoring import evaluation_data

EXPORT_FILE = "export.json"


def build_parser() -> Parser:
    parser = Parser(
        prog="ftctl export",
        description="Export a run as a standalone model (merged transformers weights, ONNX, GGUF) and check that it "
        "predicts what the run does.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or a checkpoint-N directory inside one)")
    parser.add_argument("--format", required=True, choices=exporting.FORMATS, help="what to export")
    parser.add_argument("--output", metavar="DIR", required=True, help="directory to write the export to")
    parser.add_argument("--model", help="base model for an adapter (default: the one in its adapter config)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it holds an earlier export")
    parity.add_options(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Export the run, check parity, and write DIR/export.json and DIR/parity.json."""
    quiet()
    opts = build_parser().parse_strict(list(sys.argv[1:] if argv is None else argv))
    fmt, output = opts["format"], Path(opts["output"])
    parity.check_threshold(opts["max_disagreement"])
    weights, spec = runs.locate(opts["run_dir"])
    run = runs.from_saved(weights, spec, opts["model"], **({"max_eval_samples": None} if opts["data"] else {}))
    exporting.check_format(run, fmt)
    exporting.check_output(output, opts["overwrite"], EXPORT_FILE, "an earlier export")
    runs.check_weights(weights, run.method.is_peft)
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
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with tempfile.TemporaryDirectory(prefix="ftctl-export-") as scratch:
        args = training_arguments(parity.scoring_config(run.cfg), run.task, scratch, run.launch)
        check_world(args)
        _, record = exporting.export_run(
            run, weights, tokenizer, fmt, output, (args, raw, encoded), opts["max_disagreement"], (EXPORT_FILE, info)
        )
    console.print(f"[green]exported[/] {opts['run_dir']} as {fmt} into {output}")
    console.print(parity.summary(record))
    parity.enforce(record, f"the {fmt} export", str(output / parity.PARITY_FILE))
    return record


if __name__ == "__main__":
    sys.exit(run_main(main))
