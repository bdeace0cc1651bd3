"""Score a saved run or checkpoint: `ftctl evaluate RUN_DIR` and `python -m launch.evaluate RUN_DIR` run `main`.

Loads the fine-tuned model or adapter (the base model from the adapter config, or `--model`), scores it on the
run's test split (else validation) or on `--data FILE`, and writes `eval.json` plus per-example predictions.
`--baseline` also scores the untouched base model with a freshly initialised head: the honest "before" number.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase, set_seed

from ftctl.errors import FtctlError, run_main
from ftctl.models import load_kwargs
from ftctl.options import Parser
from launch.run import rundir, runs
from launch.run.arguments import check_world, training_arguments
from launch.run.cache import encode_cached
from launch.run.card import model_card
from launch.run.console import console, show_metrics
from launch.run.quiet import quiet, quiet_transformers
from launch.run.scoring import Scored, evaluation_data, score_model
from tasks.base import Prompted, Task


def build_parser() -> Parser:
    parser = Parser(prog="ftctl evaluate", description="Score a fine-tuned run directory or one of its checkpoints.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or a checkpoint-N directory inside one)")
    parser.add_argument("--data", metavar="FILE", help="score this file instead of the run's own test/validation data")
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        help="which of the run's splits (default: test if the data has one, else validation)",
    )
    parser.add_argument("--model", help="base model for an adapter (default: the one in its adapter config)")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also score the base model before fine-tuning: zero-shot with the run's prompts (prompted tasks), or "
        "with a new, untrained head (head-based tasks: about chance, and labelled so)",
    )
    parser.add_argument(
        "--few-shot",
        type=int,
        metavar="K",
        help="prompted tasks: also score the base model with K training examples in its prompt (in-context "
        "learning; a fixed, seeded choice, classes balanced for classification)",
    )
    parser.add_argument("--output", metavar="FILE", help="where to write the metrics (default: RUN_DIR/eval.json)")
    parser.add_argument(
        "--text-column", nargs="+", action="extend", help="text column(s) of --data (default: the run's)"
    )
    parser.add_argument("--label-column", help="label column of --data (default: the run's)")
    parser.add_argument(
        "--max-eval-samples", type=int, help="score at most this many examples (default: all of --data, else the run's)"
    )
    parser.add_argument("--batch-size", type=int, help="evaluation batch size")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Score a run directory (and, with --baseline/--few-shot, its base model) and write eval.json."""
    quiet()
    opts = build_parser().parse_strict(list(sys.argv[1:] if argv is None else argv))
    weights, spec = runs.locate(opts["run_dir"])
    output = Path(opts["output"]) if opts["output"] else weights / "eval.json"
    if output.exists() and output.is_dir():
        raise FtctlError(f"--output {output} is a directory; give a file path")
    run = load_run(opts, weights, spec)
    runs.check_weights(weights, run.method.is_peft)
    check_few_shot(run, opts["few_shot"])  # refused before anything is loaded
    raw, source = evaluation_data(run, opts["data"], opts["split"])

    quiet_transformers()
    run, tokenizer = runs.with_saved_tokenizer(run, weights)
    encoded = encode_cached(run.task, raw, tokenizer, run.cfg.token_cache)
    model_kwargs = {**load_kwargs(run.cfg), **run.method.load_kwargs(run.context())}
    with tempfile.TemporaryDirectory(prefix="ftctl-eval-") as scratch:
        args = training_arguments(run.cfg, run.task, scratch, run.launch)
        check_world(args)
        model = runs.load_trained(run, weights, tokenizer, model_kwargs)
        after = score_model(run, args, model, tokenizer, encoded)
        del model
        before = score_baselines(run, opts, args, tokenizer, model_kwargs, raw)

    result = eval_json(opts, run, weights, raw, source, after, before)
    if args.process_index == 0:
        write(output, result, run, raw, after, before)
        title = f"{run.task.preset_name} / {run.method.variant} on {source}: {len(raw):,} examples"
        show_metrics(title, after.metrics, {name: b.metrics for name, b in before.items()})
        console.print(f"wrote {output}")
    return result


BASELINE_KINDS = {  # baseline name -> what eval.json says it is
    "zero-shot": "zero-shot: the base model, prompted the same way",
    "untrained head": "untrained head: the base model with a new, untrained task head (about chance)",
}


def baseline_name(task: Task) -> str:
    """What the base model's score is for this task: prompted zero-shot, or a new head's untrained guess."""
    return "zero-shot" if isinstance(task, Prompted) else "untrained head"


def check_few_shot(run: runs.Run, k: int | None) -> None:
    if k is None:
        return
    if k < 1:
        raise FtctlError(f"--few-shot must be at least 1, got {k}")
    if not isinstance(run.task, Prompted):
        raise FtctlError(
            f"--few-shot: task '{run.task.preset_name}' predicts with a new head, which no prompt feeds; examples in "
            "a prompt need a prompted task (e.g. sst2_t2t for classification by generation)"
        )


def score_baselines(
    run: runs.Run,
    opts: dict[str, Any],
    args: Any,
    tokenizer: PreTrainedTokenizerBase,
    model_kwargs: dict[str, Any],
    raw: datasets.Dataset,
) -> dict[str, Scored]:
    """The base model before fine-tuning: zero-shot (`--baseline`) and with K examples in the prompt (`--few-shot`),
    each on the same examples and prompts as the fine-tuned model."""
    scored: dict[str, Scored] = {}
    tasks: dict[str, Task] = {}
    if opts["baseline"]:
        tasks[baseline_name(run.task)] = run.task
    if opts["few_shot"]:
        train = run.task.load().splits["train"]
        if opts["few_shot"] > len(train):
            raise FtctlError(f"--few-shot {opts['few_shot']}: the training data has only {len(train)} examples")
        assert isinstance(run.task, Prompted)  # check_few_shot refused the others
        shots = run.task.few_shot(train, opts["few_shot"], run.cfg.seed)
        tasks[f"{opts['few_shot']}-shot"] = run.task.bind(shots=shots)
    for name, task in tasks.items():
        set_seed(run.cfg.seed)  # an untrained head starts from the same seeded initialisation as training did
        encoded = encode_cached(task, raw, tokenizer, run.cfg.token_cache)
        base = task.build_model(run.model_ref, tokenizer, model_kwargs)
        scored[name] = score_model(dataclasses.replace(run, task=task), args, base, tokenizer, encoded)
    return scored


def load_run(opts: dict[str, Any], weights: Path, spec: dict[str, Any]) -> runs.Run:
    """The recorded run, with the options this command overrides (runs.from_saved)."""
    overrides: dict[str, Any] = {}
    if opts["data"]:
        overrides["max_eval_samples"] = None  # the run's cap was for its own splits; a file given here is scored whole
    for key in ("text_column", "label_column", "max_eval_samples"):
        if opts[key] is not None:
            overrides[key] = opts[key]
    if opts["batch_size"] is not None:
        if opts["batch_size"] <= 0:
            raise FtctlError(f"--batch-size must be greater than 0, got {opts['batch_size']}")
        overrides["eval_batch_size"] = opts["batch_size"]
    return runs.from_saved(weights, spec, opts["model"], **overrides)


def eval_json(
    opts: dict[str, Any],
    run: runs.Run,
    weights: Path,
    raw: datasets.Dataset,
    source: str,
    after: Scored,
    before: dict[str, Scored],
) -> dict[str, Any]:
    result: dict[str, Any] = {**after.metrics, "details": after.details}
    name = baseline_name(run.task)
    if name in before:
        result["baseline"] = {**before[name].metrics, "details": before[name].details}
        result["baseline_kind"] = BASELINE_KINDS[name]
    if opts["few_shot"]:
        few = before[f"{opts['few_shot']}-shot"]
        result["few_shot"] = {"k": opts["few_shot"], "metrics": few.metrics, "details": few.details}
    result["info"] = {
        "run_dir": str(Path(opts["run_dir"]).resolve()),
        "weights": str(weights.resolve()),
        "base_model": run.model_ref,
        "data": source,
        "examples": len(raw),
        "runtime_s": after.seconds,
        "examples_per_second": len(raw) / after.seconds if after.seconds else None,
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return result


def write(
    output: Path,
    result: dict[str, Any],
    run: runs.Run,
    raw: datasets.Dataset,
    after: Scored,
    before: dict[str, Scored],
) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_json(output, result)
    stem = output.with_suffix("")
    rundir.write_jsonl(Path(f"{stem}_predictions.jsonl"), after.task.prediction_rows(raw, after.predictions))
    for name, scored in before.items():
        suffix = "baseline" if name == baseline_name(run.task) else "few_shot"
        rows = scored.task.prediction_rows(raw, scored.predictions)
        rundir.write_jsonl(Path(f"{stem}_{suffix}_predictions.jsonl"), rows)
    run_file = output.parent / rundir.RUN_FILE
    if before and output.name == "eval.json" and run_file.is_file():
        # the run's own model card gains the before/after results (the Hub shows them from its model-index)
        card = model_card(rundir.read_json(run_file, "run record"), result)
        rundir.write_text(output.parent / "README.md", card)


if __name__ == "__main__":
    sys.exit(run_main(main))
