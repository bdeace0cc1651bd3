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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase, set_seed

from ftctl.errors import FtctlError, run_main
from ftctl.models import load_kwargs, load_tokenizer, resolve_model
from ftctl.options import Parser
from launch import engine, record, rundir, runs
from launch.cache import encode_cached
from launch.console import console, show_metrics
from launch.quiet import quiet, quiet_transformers


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
    parser.add_argument("--baseline", action="store_true", help="also score the base model before fine-tuning")
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


@dataclass
class Scored:
    metrics: dict[str, Any]
    details: dict[str, Any]
    predictions: Any
    seconds: float


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Score a run directory (and, with --baseline, its base model) and write eval.json."""
    quiet()
    opts = build_parser().parse_strict(list(sys.argv[1:] if argv is None else argv))
    weights, spec = locate(opts["run_dir"])
    output = Path(opts["output"]) if opts["output"] else weights / "eval.json"
    if output.exists() and output.is_dir():
        raise FtctlError(f"--output {output} is a directory; give a file path")
    run = load_run(opts, weights, spec)
    check_weights(weights, run.method.is_peft)
    raw, source = evaluation_data(run, opts)

    quiet_transformers()
    tokenizer = load_tokenizer(str(weights), run.cfg.trust_remote_code)
    run.task.prepare_tokenizer(tokenizer, run.family)
    run = dataclasses.replace(run, task=run.task.bind(tokenizer=tokenizer))
    encoded = encode_cached(run.task, raw, tokenizer, run.cfg.token_cache)
    model_kwargs = {**load_kwargs(run.cfg), **run.method.load_kwargs(run.context())}
    with tempfile.TemporaryDirectory(prefix="ftctl-eval-") as scratch:
        args = engine.training_arguments(run.cfg, run.task, scratch, run.launch)
        engine.check_world(args)
        try:
            model = run.method.load_trained(run.task, str(weights), run.model_ref, tokenizer, model_kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise FtctlError(f"cannot load the fine-tuned model from {weights}: {str(exc).splitlines()[0]}") from None
        after = score_model(run, args, model, tokenizer, encoded)
        before = None
        if opts["baseline"]:
            set_seed(run.cfg.seed)  # the untrained head starts from the same seeded initialisation as training did
            before = score_model(
                run, args, run.task.build_model(run.model_ref, tokenizer, model_kwargs), tokenizer, encoded
            )

    result = eval_json(opts, run, weights, raw, source, after, before)
    if args.process_index == 0:
        write(output, result, run, raw, after, before)
        show_metrics(
            f"{run.task.preset_name} / {run.method.variant} on {source}: {len(raw):,} examples",
            after.metrics,
            before.metrics if before else None,
        )
        console.print(f"wrote {output}")
    return result


def load_run(opts: dict[str, Any], weights: Path, spec: dict[str, Any]) -> runs.Run:
    """The recorded run, with the options this command overrides; its base model from --model, the adapter config
    (adapters) or the run record (full models)."""
    overrides: dict[str, Any] = {
        # scoring needs no logging, checkpoints or sharded optimizer; the saved result loads without DeepSpeed
        "report_to": ["none"],
        "eval_strategy": "no",
        "save_strategy": "no",
        "early_stopping_patience": None,
        "save_every": None,
        "keep_last": None,
        "deepspeed": None,
    }
    if opts["data"]:
        overrides["max_eval_samples"] = None  # the run's cap was for its own splits; a file given here is scored whole
    for key in ("text_column", "label_column", "max_eval_samples"):
        if opts[key] is not None:
            overrides[key] = opts[key]
    if opts["batch_size"] is not None:
        if opts["batch_size"] <= 0:
            raise FtctlError(f"--batch-size must be greater than 0, got {opts['batch_size']}")
        overrides["eval_batch_size"] = opts["batch_size"]
    base = resolve_model(opts["model"]) if opts["model"] else None
    if base is None and (weights / "adapter_config.json").is_file():
        adapter = rundir.read_json(weights / "adapter_config.json", "adapter config")
        base = resolve_model(adapter.get("base_model_name_or_path"))
    where = str(weights / rundir.RUN_FILE)
    return runs.from_record(spec["config"], spec["task_state"], where, model=base or spec["model_ref"], **overrides)


def evaluation_data(run: runs.Run, opts: dict[str, Any]) -> tuple[datasets.Dataset, str]:
    """The examples to score and where they come from: --data, else the run's test (or validation) split."""
    task, cfg = run.task, run.cfg
    if opts["data"]:
        raw = task.read_file(opts["data"], "evaluation data")
        if cfg.max_eval_samples:
            raw = raw.select(range(min(len(raw), cfg.max_eval_samples)))
        split, source = "evaluation", opts["data"]
    else:
        data = task.load()
        split = opts["split"] or ("test" if "test" in data.splits else "validation")
        if split not in data.splits:
            raise FtctlError(f"the run's data has no {split} split; pass --data FILE")
        raw, source = data.splits[split], f"{data.source} ({split})"
    task.check_data({split: raw}, training=False)
    return raw, source


def score_model(
    run: runs.Run, args: Any, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, encoded: datasets.Dataset
) -> Scored:
    trainer = engine.build_trainer(run.cfg, args, run.task, run.method, model, tokenizer, None, None)
    started = time.time()
    metrics, details, predictions = engine.score(trainer, run.task, encoded)
    return Scored(metrics, details, predictions, time.time() - started)


def eval_json(
    opts: dict[str, Any],
    run: runs.Run,
    weights: Path,
    raw: datasets.Dataset,
    source: str,
    after: Scored,
    before: Scored | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {**after.metrics, "details": after.details}
    if before is not None:
        result["baseline"] = {**before.metrics, "details": before.details}
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
    output: Path, result: dict[str, Any], run: runs.Run, raw: datasets.Dataset, after: Scored, before: Scored | None
) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_json(output, result)
    stem = output.with_suffix("")
    rundir.write_jsonl(Path(f"{stem}_predictions.jsonl"), run.task.prediction_rows(raw, after.predictions))
    if before is not None:
        rundir.write_jsonl(
            Path(f"{stem}_baseline_predictions.jsonl"), run.task.prediction_rows(raw, before.predictions)
        )
    run_file = output.parent / rundir.RUN_FILE
    if before is not None and output.name == "eval.json" and run_file.is_file():
        # the run's own model card gains the before/after results (the Hub shows them from its model-index)
        card = record.model_card(rundir.read_json(run_file, "run record"), result)
        rundir.write_text(output.parent / "README.md", card)


def locate(run_dir: str) -> tuple[Path, dict[str, Any]]:
    """(directory holding the weights, run spec) for a finished run or a checkpoint."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FtctlError(f"run directory not found: {run_dir}")
    if (path / rundir.RUN_FILE).is_file():
        record = rundir.read_json(path / rundir.RUN_FILE, "run record")
        if record.get("status") != "completed" or "config" not in record:
            raise FtctlError(f"{path / rundir.RUN_FILE} is not a completed ftctl run record")
        return path, {
            "config": record["config"],
            "task_state": record["task"]["state"],
            "model_ref": record["model"]["name_or_path"],
        }
    for spec_path in (path / rundir.SPEC_FILE, path.parent / rundir.SPEC_FILE):
        if spec_path.is_file() and path.name.startswith("checkpoint-"):
            return path, rundir.read_json(spec_path, "run spec")
    if (path / rundir.SPEC_FILE).is_file():
        checkpoints = sorted(p.name for p in path.glob("checkpoint-*"))
        hint = f"evaluate a checkpoint, e.g. {path / checkpoints[-1]}, or " if checkpoints else ""
        raise FtctlError(f"the run in {run_dir} did not finish (no run.json); {hint}continue it with --resume")
    raise FtctlError(f"{run_dir} is not an ftctl run directory (no run.json) nor a checkpoint of one")


def check_weights(weights: Path, peft: bool) -> None:
    """Refuse a directory whose weights are missing or unreadable, before loading anything."""
    name = "adapter_model.safetensors" if peft else "model.safetensors"
    files = [weights / name] if (weights / name).is_file() else sorted(weights.glob(name.replace(".", "-*.", 1)))
    if not files:
        raise FtctlError(f"{weights} has no {name}: the run directory is incomplete or damaged")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):  # checks the header against the file's length
                pass
        except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
            raise FtctlError(
                f"{file} is damaged or truncated ({str(exc).splitlines()[0]}); re-run or restore it"
            ) from None


if __name__ == "__main__":
    sys.exit(run_main(main))
