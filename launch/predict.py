"""Use a fine-tuned run on new inputs: `ftctl predict RUN --data FILE` and `ftctl generate RUN --prompt TEXT`
(`python -m launch.predict ...`, `python -m launch.predict generate ...`).

A run directory (adapter or full model; its base model found as `ftctl evaluate` finds it) is loaded through the one
run-loading path (launch/run/runs.py) and run on unlabelled inputs with the run's own prompts and settings: batched,
sorted by length, with the KV cache for generation, on whatever device the machine has. The same code scores
`ftctl evaluate`, so `predict` on a labelled file gives the predictions `evaluate` wrote for it. Rows carry the input
and the prediction: the label and per-class probabilities (classification), tags per word (NER), the span and its
score (QA), the generated text (generation), the label scored by likelihood and the generated one (text-to-text
classification); the fields about a gold answer are left out.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import datasets

from ftctl.errors import FtctlError, run_main
from ftctl.models import load_kwargs
from ftctl.options import Parser
from launch.run import rundir, runs
from launch.run.arguments import check_world, training_arguments
from launch.run.console import console
from launch.run.quiet import quiet, quiet_transformers
from launch.run.scoring import score
from launch.run.trainer import build_trainer
from tasks.base import SamplesGenerations, TakesText


def _common(parser: Parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or a checkpoint-N directory inside one)")
    parser.add_argument("--model", help="base model for an adapter (default: the one in its adapter config)")
    parser.add_argument("--batch-size", type=int, help="inputs per batch")
    parser.add_argument("--max-new-tokens", type=int, help="generation: most tokens written per input")


def predict_parser() -> Parser:
    parser = Parser(prog="ftctl predict", description="Run a fine-tuned model on new, unlabelled inputs.")
    _common(parser)
    parser.add_argument("--data", required=True, metavar="FILE", help="inputs, in any format the task reads")
    parser.add_argument(
        "--output", metavar="FILE", help="where to write (default: RUN_DIR/predict/<data file name>.jsonl)"
    )
    parser.add_argument("--format", choices=("jsonl", "csv"), help="output format (default: by --output's suffix)")
    parser.add_argument(
        "--text-column", nargs="+", action="extend", help="text column(s) of --data (default: the run's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def generate_parser() -> Parser:
    parser = Parser(
        prog="ftctl generate", description="Have a generative run answer prompts, with its own prompt format."
    )
    _common(parser)
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="an input (repeatable; `-`: one per line of stdin)",
    )
    parser.add_argument("--context", help="a second input where the task has one (the context of generative QA)")
    return parser


def load(opts: dict[str, Any], **overrides: Any) -> tuple[runs.Run, Path]:
    """The finished run, checked, with the options given here."""
    weights, spec = runs.locate(opts["run_dir"])
    for key in ("batch_size", "max_new_tokens"):
        if opts.get(key) is not None and opts[key] < 1:
            raise FtctlError(f"--{key.replace('_', '-')} must be at least 1, got {opts[key]}")
    if opts.get("batch_size"):
        overrides["eval_batch_size"] = opts["batch_size"]
    if opts.get("max_new_tokens"):
        overrides["max_new_tokens"] = opts["max_new_tokens"]
    run = runs.from_saved(weights, spec, opts["model"], max_eval_samples=None, **overrides)
    runs.check_weights(weights, run.method.is_peft)
    return run, weights


def infer(run: runs.Run, weights: Path, raw: datasets.Dataset) -> list[dict[str, Any]]:
    """The run's predictions on `raw` (inputs with or without answers), one row per input, gold fields left out."""
    quiet_transformers()
    run, tokenizer = runs.with_saved_tokenizer(run, weights)
    task = run.task
    raw = task.unlabelled(raw)
    task.check_data({"input": raw}, training=False)
    if isinstance(task, SamplesGenerations):  # scored by perplexity: here every prompt is answered
        task = task.with_options(num_samples=len(raw))
    run = dataclasses.replace(run, task=task)
    encoded = task.encode(raw, tokenizer)
    model_kwargs = {**load_kwargs(run.cfg), **run.method.load_kwargs(run.context())}
    with tempfile.TemporaryDirectory(prefix="ftctl-predict-") as scratch:
        args = training_arguments(run.cfg, task, scratch, run.launch)
        check_world(args)
        model = runs.load_trained(run, weights, tokenizer, model_kwargs)
        trainer = build_trainer(run.cfg, args, task, run.method, model, tokenizer, None, None)
        _, _, predictions = score(trainer, task, encoded)
    return [
        {k: v for k, v in row.items() if k not in task.gold_fields} for row in task.prediction_rows(raw, predictions)
    ]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """`ftctl predict`: predictions for every input of --data, written as JSONL or CSV."""
    quiet()
    opts = predict_parser().parse_strict(list(sys.argv[1:] if argv is None else argv))
    output = (
        Path(opts["output"])
        if opts["output"]
        else Path(opts["run_dir"]) / "predict" / f"{Path(opts['data']).stem}.jsonl"
    )
    suffix = output.suffix.lower()
    if not opts["format"] and suffix not in (".csv", ".jsonl", ".json"):
        raise FtctlError(f"--output {output}: say the format by the name (.jsonl or .csv) or with --format jsonl/csv")
    form = opts["format"] or ("csv" if suffix == ".csv" else "jsonl")
    if output.exists() and not opts["overwrite"]:
        raise FtctlError(f"{output} already exists; pass --overwrite to replace it or choose another --output")
    run, weights = load(opts, **({"text_column": opts["text_column"]} if opts["text_column"] else {}))
    if not Path(opts["data"]).is_file():
        raise FtctlError(f"--data {opts['data']} not found")
    rows = infer(run, weights, run.task.read_file(opts["data"], "input data"))
    write(output, rows, form)
    console.print(f"wrote {len(rows):,} predictions to {output}")
    return rows


def generate(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """`ftctl generate`: what a generative run writes for each prompt, printed (and returned)."""
    quiet()
    opts = generate_parser().parse_strict(list(sys.argv[1:] if argv is None else argv))
    prompts = [line.rstrip("\n") for p in opts["prompt"] for line in (sys.stdin if p == "-" else [p])]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise FtctlError("--prompt: no text given (with `-`, stdin was empty)")
    run, weights = load(opts)
    if not isinstance(run.task, TakesText):
        raise FtctlError(
            f"ftctl generate: task '{run.task.preset_name}' does not generate text; use ftctl predict RUN --data FILE"
        )
    raw = datasets.Dataset.from_list([run.task.example_from_text(p, opts["context"]) for p in prompts])
    rows = infer(run, weights, raw)
    for prompt, row in zip(prompts, rows, strict=True):
        console.print(f"[bold]> {prompt}[/]")
        console.print(str(row.get("generated", row.get("prediction"))), markup=False)
    return rows


def write(output: Path, rows: list[dict[str, Any]], form: str) -> None:
    """JSONL (one object per input), or CSV (nested values as JSON text, per-class probabilities one column each)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if form == "jsonl":
        rundir.write_jsonl(output, rows)
        return
    flat = []
    for row in rows:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value
        flat.append(out)
    columns = list(dict.fromkeys(k for row in flat for k in row))
    staging = output.with_name(output.name + ".tmp")
    with staging.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    staging.replace(output)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        sys.exit(run_main(generate, sys.argv[2:]))
    sys.exit(run_main(main))
