"""Score a saved run or checkpoint: `ftctl evaluate RUN_DIR` and `python -m launch.evaluate RUN_DIR` run `main`.

Loads the fine-tuned model or adapter (the base model from the adapter config, or `--model`), scores it on the
run's test split (else validation) or on `--data FILE`, and writes `eval.json` plus per-example predictions.
`--baseline` also scores the untouched base model with a freshly initialised head: the honest "before" number.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from launch.quiet import quiet


def build_parser() -> Any:
    from launch.options import Parser

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


def locate(run_dir: str) -> tuple[Path, dict[str, Any]]:
    """(directory holding the weights, run spec) for a finished run or a checkpoint."""
    from launch import rundir
    from launch.errors import FtctlError

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
    from launch.errors import FtctlError

    name = "adapter_model.safetensors" if peft else "model.safetensors"
    files = [weights / name] if (weights / name).is_file() else sorted(weights.glob(name.replace(".", "-*.", 1)))
    if not files:
        raise FtctlError(f"{weights} has no {name}: the run directory is incomplete or damaged")
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt"):  # checks the header against the file's length
                pass
        except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
            raise FtctlError(
                f"{file} is damaged or truncated ({str(exc).splitlines()[0]}); re-run or restore it"
            ) from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_strict(argv)

    from launch import rundir
    from launch.config import resolve_values
    from launch.errors import FtctlError

    weights, spec = locate(opts["run_dir"])
    output = Path(opts["output"]) if opts["output"] else weights / "eval.json"
    if output.exists() and output.is_dir():
        raise FtctlError(f"--output {output} is a directory; give a file path")

    values = dict(spec["config"])
    if opts["data"]:
        values["max_eval_samples"] = None  # the run's cap was for its own splits; a file given here is scored whole
    for key in ("text_column", "label_column", "max_eval_samples"):
        if opts[key] is not None:
            values[key] = opts[key]
    if opts["batch_size"] is not None:
        if opts["batch_size"] <= 0:
            raise FtctlError(f"--batch-size must be greater than 0, got {opts['batch_size']}")
        values["eval_batch_size"] = opts["batch_size"]
    run = resolve_values(values)
    cfg, task, method = run.cfg, run.task, run.method
    task.state = spec["task_state"]
    check_weights(weights, method.is_peft)

    from launch.models import load_config, load_kwargs, load_tokenizer, model_family, resolve_model

    base_ref = resolve_model(opts["model"]) if opts["model"] else None
    if method.is_peft:
        adapter = rundir.read_json(weights / "adapter_config.json", "adapter config")
        base_ref = base_ref or resolve_model(adapter.get("base_model_name_or_path"))
    else:
        base_ref = base_ref or resolve_model(spec["model_ref"])
    model_config = load_config(base_ref, cfg.trust_remote_code)
    family = model_family(model_config)
    task.check_model(model_config, family)

    if opts["data"]:
        raw = task.read_file(opts["data"], "evaluation data")
        if cfg.max_eval_samples:
            raw = raw.select(range(min(len(raw), cfg.max_eval_samples)))
        split = "data"
        source = opts["data"]
    else:
        splits = task.load()
        split = opts["split"] or ("test" if "test" in splits else "validation")
        if split not in splits:
            raise FtctlError(f"the run's data has no {split} split; pass --data FILE")
        raw = splits[split]
        source = f"{task.data_source} ({split})"
    task.check_data({split: raw}, training=False)

    from launch.quiet import quiet_transformers

    quiet_transformers()
    from transformers import set_seed

    from launch import engine
    from launch.cache import encode_cached
    from launch.console import console, show_metrics
    from methods.base import Context

    tokenizer = load_tokenizer(str(weights), cfg.trust_remote_code)
    task.prepare_tokenizer(tokenizer, family)
    encoded = encode_cached(task, raw, tokenizer, cfg.token_cache)
    ctx = Context(cfg=cfg, task=task, model_config=model_config, family=family)
    model_kwargs = {**load_kwargs(cfg), **method.load_kwargs(ctx)}

    with tempfile.TemporaryDirectory(prefix="ftctl-eval-") as scratch:
        cfg.report_to, cfg.eval_strategy, cfg.save_strategy, cfg.early_stopping_patience = ["none"], "no", "no", None
        cfg.deepspeed = None  # scoring needs no sharded optimizer; the saved result loads without DeepSpeed
        args = engine.training_arguments(cfg, task, scratch)
        engine.check_world(args)

        def evaluate_model(model: Any) -> tuple[dict[str, Any], dict[str, Any], Any, float]:
            trainer = engine.build_trainer(cfg, args, task, method, model, tokenizer, None, None)
            started = time.time()
            metrics, details, predictions = engine.score(trainer, task, encoded)
            return metrics, details, predictions, time.time() - started

        try:
            model = method.load_trained(task, str(weights), base_ref, tokenizer, model_kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise FtctlError(f"cannot load the fine-tuned model from {weights}: {str(exc).splitlines()[0]}") from None
        after, details, predictions, seconds = evaluate_model(model)
        before = None
        if opts["baseline"]:
            set_seed(cfg.seed)  # the untrained head starts from the same seeded initialisation as training did
            base = task.build_model(base_ref, tokenizer, model_kwargs)
            before, before_details, before_predictions, _ = evaluate_model(base)

    result: dict[str, Any] = {**after, "details": details}
    if before is not None:
        result["baseline"] = {**before, "details": before_details}
    result["info"] = {
        "run_dir": str(Path(opts["run_dir"]).resolve()),
        "weights": str(weights.resolve()),
        "base_model": base_ref,
        "data": source,
        "examples": len(raw),
        "runtime_s": seconds,
        "examples_per_second": len(raw) / seconds if seconds else None,
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.process_index == 0:
        output.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_json(output, result)
        stem = output.with_suffix("")
        rundir.write_jsonl(Path(f"{stem}_predictions.jsonl"), task.prediction_rows(raw, predictions))
        if before is not None:
            rows = task.prediction_rows(raw, before_predictions)
            rundir.write_jsonl(Path(f"{stem}_baseline_predictions.jsonl"), rows)
        show_metrics(f"{task.preset_name} / {method.variant} on {source}: {len(raw):,} examples", after, before)
        console.print(f"wrote {output}")
    return result


if __name__ == "__main__":
    from launch.errors import run_main

    sys.exit(run_main(main))
