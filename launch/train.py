"""Fine-tune: `python -m launch.train`, `accelerate launch -m launch.train` and `ftctl train` all run `main`.

The story: resolve the config; check the output directory, the model and the data (every user error is raised in
`setup`, before anything is written); build the model and apply the method; train with the Trainer; score the
validation (and test) split; stage the final model and commit the run directory, `run.json` last.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.quiet import quiet


@dataclass
class Setup:
    """A run ready to train: everything checked and loaded, nothing written yet."""

    run: Any  # launch.config.Resolved
    model_ref: str
    model_config: Any
    family: str
    args: Any  # TrainingArguments
    tokenizer: Any
    splits: dict[str, Any]
    encoded: dict[str, Any]
    model: Any
    resume_checkpoint: str | None


def setup(argv: list[str], prog: str = "python -m launch.train") -> Setup:
    """Resolve and check everything; load data, tokenizer and model; apply the method. Writes nothing."""
    from launch import rundir
    from launch.config import default_output_dir, resolve
    from launch.models import load_config, load_tokenizer, model_family, resolve_model

    run = resolve(argv, prog)
    cfg, task, method = run.cfg, run.task, run.method
    cfg.output_dir = cfg.output_dir or default_output_dir(cfg)
    rundir.check_target(cfg.output_dir, cfg.overwrite, bool(cfg.resume or cfg.resume_from))
    resume_checkpoint = _resume_checkpoint(cfg)

    model_ref = resolve_model(cfg.model)
    model_config = load_config(model_ref, cfg.trust_remote_code)
    family = model_family(model_config)
    task.check_model(model_config, family)

    from launch.quiet import quiet_transformers

    quiet_transformers()
    from transformers import set_seed

    from launch import engine
    from methods.base import Context

    args = engine.training_arguments(cfg, task, cfg.output_dir)
    engine.check_world(args)
    ctx = Context(cfg=cfg, task=task, model_config=model_config, family=family, facts=launch_facts(args))
    method.check(ctx)

    tokenizer = load_tokenizer(model_ref, cfg.trust_remote_code)
    task.prepare_tokenizer(tokenizer, family)
    splits = task.load()
    task.check_data(splits, training=True)
    with args.main_process_first(desc="tokenizing"):
        encoded = {name: task.encode(ds, tokenizer) for name, ds in splits.items()}

    ctx.facts.update(train_examples=len(encoded["train"]), total_steps=engine.total_steps(args, len(encoded["train"])))
    set_seed(cfg.seed)
    load_kwargs = {"trust_remote_code": cfg.trust_remote_code, **method.load_kwargs(ctx)}
    model = method.apply(task.build_model(model_ref, tokenizer, load_kwargs), task, ctx)
    return Setup(run, model_ref, model_config, family, args, tokenizer, splits, encoded, model, resume_checkpoint)


def main(argv: list[str] | None = None, prog: str = "python -m launch.train") -> dict[str, Any]:
    """Run one fine-tuning job; returns the validation metrics."""
    started_process = time.time()
    quiet()
    s = setup(list(sys.argv[1:] if argv is None else argv), prog)
    cfg, task, method, args = s.run.cfg, s.run.task, s.run.method, s.args

    import yaml

    from launch import engine, rundir
    from launch.console import console, show_metrics, show_pairs
    from launch.modelcard import model_card
    from methods.base import parameter_counts, trained_modules

    trainable, total = parameter_counts(s.model)
    main_process = args.process_index == 0
    if main_process:
        show_pairs(
            "ftctl train",
            [
                ("task", f"{task.preset_name} ({task.name})"),
                ("method", method.variant),
                ("model", f"{cfg.model or 'embedded MiniLM'} ({s.model_config.model_type}, {s.family})"),
                ("data", f"{task.data_source}: " + ", ".join(f"{n} {len(d):,}" for n, d in s.splits.items())),
                ("trainable", f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)"),
                (
                    "batch",
                    f"{cfg.batch_size} = {args.per_device_train_batch_size} per step x "
                    f"{args.gradient_accumulation_steps} accumulation x {args.world_size} process(es)",
                ),
                ("learning rate", cfg.learning_rate),
                ("output", cfg.output_dir),
            ],
        )

    # ---- from here on, the run directory is written ---------------------------------------------------------
    run_dir = Path(cfg.output_dir)
    with args.main_process_first(desc="preparing the output directory"):
        if main_process:
            rundir.prepare(cfg.output_dir, overwrite=cfg.overwrite and not s.resume_checkpoint)
            spec = {
                "config": s.run.flat(),
                "explicit": s.run.explicit,
                "task_state": task.state,
                "model_ref": s.model_ref,
            }
            rundir.write_json(run_dir / rundir.SPEC_FILE, spec)

    trainer = engine.build_trainer(
        cfg,
        args,
        task,
        method,
        s.model,
        s.tokenizer,
        s.encoded["train"],
        engine.sort_by_length(s.encoded["validation"])[0],
        run_dir,
    )
    started = time.time()
    result = trainer.train(resume_from_checkpoint=s.resume_checkpoint)
    train_seconds = time.time() - started

    metrics, details, predictions = engine.score(trainer, task, s.encoded["validation"])
    test_metrics = engine.score(trainer, task, s.encoded["test"])[0] if "test" in s.encoded else None

    staging = rundir.staging_dir(run_dir) if main_process else run_dir / rundir.STAGING
    trainer.accelerator.wait_for_everyone()
    method.save(trainer, str(staging))  # every process takes part: ZeRO-3 gathers the weights
    if main_process:
        s.tokenizer.save_pretrained(str(staging))
        record = _record(
            s,
            trainable,
            total,
            trained_modules(s.model),
            result,
            trainer,
            train_seconds,
            metrics,
            details,
            test_metrics,
        )
        record["wall_time_s"] = time.time() - started_process
        (staging / "README.md").write_text(model_card(record), encoding="utf-8")
        repeat = {
            k: v for k, v in record["config"].items() if k not in ("output_dir", "overwrite", "resume", "resume_from")
        }
        (staging / "config.yaml").write_text(yaml.safe_dump(repeat, sort_keys=False), encoding="utf-8")
        rundir.write_jsonl(staging / "predictions.jsonl", task.prediction_rows(s.splits["validation"], predictions))
        rundir.commit(staging, run_dir)
        rundir.write_json(run_dir / rundir.RUN_FILE, record)
        show_metrics("validation metrics", metrics)
        if test_metrics:
            show_metrics("test metrics", test_metrics)
        console.print(
            f"[green]done[/] in {train_seconds:.1f} s: {record['samples_per_second']:.1f} samples/s, peak memory "
            f"{record['peak_memory_mb']:.0f} MB -> {run_dir}\nscore it: ftctl evaluate {run_dir} --baseline"
        )
    trainer.accelerator.wait_for_everyone()
    return metrics


def _resume_checkpoint(cfg: Any) -> str | None:
    from launch import rundir
    from launch.errors import FtctlError

    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if not path.is_dir():
            raise FtctlError(f"--resume-from: checkpoint directory not found: {cfg.resume_from}")
        return str(path)
    if not cfg.resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(cfg.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last is None:
        raise FtctlError(f"--resume: no checkpoint in {cfg.output_dir} to continue from; drop --resume to start anew")
    spec_path = out / rundir.SPEC_FILE
    if spec_path.is_file():
        old = rundir.read_json(spec_path, "run spec")["config"]
        for key in ("task", "method", "model"):
            if old.get(key) != getattr(cfg, key):
                raise FtctlError(
                    f"--resume: {cfg.output_dir} holds a run with {key}={old.get(key)!r}, not "
                    f"{getattr(cfg, key)!r}; resume with the same settings or use another --output-dir"
                )
    return last


def launch_facts(args: Any) -> dict[str, Any]:
    import torch

    state = args.distributed_state
    return {
        "num_processes": args.world_size,
        "num_machines": int(os.environ.get("NUM_MACHINES", "1")),
        "distributed_type": str(state.distributed_type).split(".")[-1].lower() if state is not None else "no",
        "deepspeed_stage": None,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("ftctl", "torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def device_info() -> dict[str, Any]:
    import platform

    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {
        "type": "cpu",
        "name": f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)",
        "count": 1,
    }


def peak_memory() -> dict[str, float | None]:
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": rss, "peak_cuda_allocated_mb": cuda, "peak_memory_mb": cuda if cuda is not None else rss}


def _record(
    s: Setup,
    trainable: int,
    total: int,
    modules: list[str],
    result: Any,
    trainer: Any,
    train_seconds: float,
    metrics: dict,
    details: dict,
    test_metrics: dict | None,
) -> dict[str, Any]:
    from launch.models import EMBEDDED_HUB_ID, EMBEDDED_NAME, is_embedded

    task, method = s.run.task, s.run.method
    state = trainer.state
    embedded = is_embedded(s.model_ref)
    tokens = state.num_input_tokens_seen or 0
    return {
        "status": "completed",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "config": s.run.flat(),
        "explicit": s.run.explicit,
        "task": {
            "name": task.name,
            "preset": task.preset_name,
            "kind": task.kind,
            "state": task.state,
            "auto_model": task.auto_model,
            "pipeline_tag": task.pipeline_tag,
            "load_args": task.load_args(s.model_config),
        },
        "method": {
            "name": method.variant,
            "peft": method.is_peft,
            "description": method.description,
            "trained_modules": modules,
        },
        "model": {
            "name_or_path": s.model_ref,
            "display": EMBEDDED_NAME if embedded else s.model_ref,
            "hub_id": EMBEDDED_HUB_ID if embedded else None,
            "model_type": s.model_config.model_type,
            "family": s.family,
        },
        "data": {"source": task.data_source, **{f"{n}_examples": len(d) for n, d in s.splits.items()}},
        "versions": _versions(),
        "device": device_info(),
        "launch": launch_facts(s.args),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "reduction_percent": 100 * (1 - trainable / total),
        "train_runtime_s": train_seconds,
        "samples_per_second": result.metrics.get("train_samples_per_second"),
        "tokens_per_second": tokens / train_seconds if train_seconds else None,
        "train_tokens": tokens,
        "global_step": state.global_step,
        "epochs_completed": state.epoch,
        "best_checkpoint": state.best_model_checkpoint,
        **peak_memory(),
        "history": state.log_history,
        "metrics": metrics,
        "metric_details": details,
        "test_metrics": test_metrics,
    }


if __name__ == "__main__":
    from launch.errors import run_main

    sys.exit(run_main(main))
