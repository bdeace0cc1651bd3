"""Fine-tune: `python -m launch.train`, `accelerate launch -m launch.train` and `ftctl train` all run `main`.

The story: resolve the config; check the output directory, the model and the data (every user error is raised in
`setup`, before anything is written); build the model and apply the method; train with the Trainer; score the
validation (and test) split; stage the final model and commit the run directory, `run.json` last.
"""

from __future__ import annotations

import os
import shlex
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
    frozen_in_autocast_dtype: int = 0  # frozen linear parameters stored in the autocast dtype (methods.base)
    cpu_dropouts: int = 0  # dropout modules swapped for launch.dropout.CpuDropout


def setup(argv: list[str], prog: str = "python -m launch.train") -> Setup:
    """Resolve and check everything; load data, tokenizer and model; apply the method. Writes nothing."""
    from launch import rundir
    from launch.config import default_output_dir, resolve
    from launch.models import check_precision, load_config, load_kwargs, load_tokenizer, model_family, resolve_model

    run = resolve(argv, prog)
    cfg, task, method = run.cfg, run.task, run.method
    cfg.output_dir = cfg.output_dir or default_output_dir(cfg)
    rundir.check_target(cfg.output_dir, cfg.overwrite, bool(cfg.resume or cfg.resume_from))
    resume_checkpoint = _resume_checkpoint(run)

    model_ref = resolve_model(cfg.model)
    model_config = load_config(model_ref, cfg.trust_remote_code)
    family = model_family(model_config)
    task.check_model(model_config, family)
    check_precision(cfg, model_config)

    from launch.quiet import quiet_transformers

    quiet_transformers()
    from transformers import set_seed

    from launch import engine
    from launch.cache import encode_cached
    from methods.base import Context

    args = engine.training_arguments(cfg, task, cfg.output_dir)
    engine.check_world(args)
    ctx = Context(cfg=cfg, task=task, model_config=model_config, family=family, facts=launch_facts(args))
    method.check(ctx)

    tokenizer = load_tokenizer(model_ref, cfg.trust_remote_code)
    task.prepare_tokenizer(tokenizer, family)
    # The main process reads (hub downloads land in the datasets cache) and tokenizes first; the others then find
    # both in the caches instead of repeating the work (and `--ddp-timeout` bounds how long they wait).
    with args.main_process_first(desc="loading and tokenizing the data"):
        splits = task.load()
        task.check_data(splits, training=True)
        encoded = {name: encode_cached(task, ds, tokenizer, cfg.token_cache) for name, ds in splits.items()}

    ctx.facts.update(train_examples=len(encoded["train"]), total_steps=engine.total_steps(args, len(encoded["train"])))
    set_seed(cfg.seed)
    model = method.apply(
        task.build_model(model_ref, tokenizer, {**load_kwargs(cfg), **method.load_kwargs(ctx)}), task, ctx
    )
    return Setup(
        run,
        model_ref,
        model_config,
        family,
        args,
        tokenizer,
        splits,
        encoded,
        model,
        resume_checkpoint,
        **speed_ups(model, args, cfg, method),
    )


def speed_ups(model: Any, args: Any, cfg: Any, method: Any) -> dict[str, int]:
    """Changes to the model that make training faster and change no result: the frozen linear layers stored in
    the autocast dtype (methods.base.frozen_linears_to), and on the CPU the dropout that draws 16 random bits per
    element (launch.dropout; FTCTL_CPU_DROPOUT=0 keeps torch's). Measured in bench/results/cpu_kernels.md."""
    import os

    import torch

    from launch.dropout import use_cpu_dropout
    from methods.base import frozen_linears_to

    converted = dropouts = 0
    if (args.bf16 or args.fp16) and not cfg.deepspeed and method.frozen_weights_in_autocast_dtype:
        converted = frozen_linears_to(model, torch.bfloat16 if args.bf16 else torch.float16)
    if args.use_cpu and os.environ.get("FTCTL_CPU_DROPOUT", "1") != "0":  # use_cpu: no CUDA (engine)
        dropouts = use_cpu_dropout(model)
    return {"frozen_in_autocast_dtype": converted, "cpu_dropouts": dropouts}


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
    _raise_if_stopped(trainer, argv if argv is not None else sys.argv[1:], prog)

    metrics, details, predictions = engine.score(trainer, task, s.encoded["validation"])
    test_metrics = engine.score(trainer, task, s.encoded["test"])[0] if "test" in s.encoded else None
    tokens = trainer.token_counts()  # a collective: every process takes part

    staging = rundir.staging_dir(run_dir) if main_process else run_dir / rundir.STAGING
    trainer.accelerator.wait_for_everyone()
    method.save(trainer, str(staging))  # every process takes part: ZeRO-3 gathers the weights
    if main_process:
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle the Trainer adds; run.json has it all
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
            saved=staging,
        )
        record.update(tokens, wall_time_s=time.time() - started_process)
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
    _leave_process_group()
    return metrics


def _leave_process_group() -> None:
    """Shut the distributed process group down before the interpreter does: left to interpreter exit, gloo's worker
    threads are sometimes still joinable when their C++ destructors run, and the process dies with "terminate called
    without an active exception" (exit 1) after a run that succeeded (seen with DeepSpeed ZeRO-3 on 2 CPU
    processes)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _raise_if_stopped(trainer: Any, argv: list[str], prog: str) -> None:
    """After a signal, the Trainer has written a checkpoint and stopped: say where it is and how to continue."""
    import signal

    from launch.reliability import GracefulStop, RunStopped

    stopper = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GracefulStop))
    if stopper.received is None:
        return
    from transformers.trainer_utils import get_last_checkpoint

    trainer.accelerator.wait_for_everyone()
    checkpoint = get_last_checkpoint(trainer.args.output_dir)
    again = shlex.join([*prog.split(), *[a for a in argv if a not in ("--overwrite", "--resume")], "--resume"])
    raise RunStopped(
        f"{signal.Signals(stopper.received).name} received: stopped after step {trainer.state.global_step} with a "
        f"checkpoint in {checkpoint}; continue with: {again}",
        stopper.received,
    )


def _resume_checkpoint(run: Any) -> str | None:
    """The checkpoint to continue from (`--resume`: the newest complete one in --output-dir), checked against this
    run: a checkpoint of a run with another task, method, model or adapter shape is refused."""
    import dataclasses

    from launch import rundir
    from launch.errors import FtctlError

    cfg = run.cfg
    if cfg.resume_from:
        checkpoint = Path(cfg.resume_from)
        if not checkpoint.is_dir():
            raise FtctlError(f"--resume-from: checkpoint directory not found: {cfg.resume_from}")
    elif cfg.resume:
        from transformers.trainer_utils import get_last_checkpoint

        out = Path(cfg.output_dir)
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise FtctlError(
                f"--resume: no checkpoint in {cfg.output_dir} to continue from; drop --resume to start anew"
            )
        checkpoint = Path(last)
    else:
        return None
    spec_path = checkpoint / rundir.SPEC_FILE
    if not spec_path.is_file():
        raise FtctlError(f"{checkpoint} is not a checkpoint written by ftctl (no {rundir.SPEC_FILE}); cannot resume it")
    old = rundir.read_json(spec_path, "checkpoint spec").get("config", {})
    now = run.flat()
    for key in ("task", "method", "model", "deepspeed", *(f.name for f in dataclasses.fields(run.method.opts))):
        if old.get(key) != now.get(key):
            raise FtctlError(
                f"cannot resume {checkpoint}: it was trained with {key}={old.get(key)!r}, this run has "
                f"{key}={now.get(key)!r}; resume with the same settings or start a new --output-dir"
            )
    return str(checkpoint)


def launch_facts(args: Any) -> dict[str, Any]:
    import torch

    from launch.engine import deepspeed_stage

    state = args.distributed_state
    local = int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size))
    return {
        "num_processes": args.world_size,
        "num_machines": max(1, args.world_size // max(1, local)),
        "distributed_type": str(state.distributed_type).split(".")[-1].lower() if state is not None else "no",
        "deepspeed_stage": deepspeed_stage(args),
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
    saved: Path | None = None,
) -> dict[str, Any]:
    from launch.models import EMBEDDED_HUB_ID, EMBEDDED_NAME, is_embedded
    from methods.base import saved_weights

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
            **method.record(s.model),  # method facts: parameter groups, final ranks, quantization, ...
        },
        "model": {
            "name_or_path": s.model_ref,
            "display": EMBEDDED_NAME if embedded else s.model_ref,
            "hub_id": EMBEDDED_HUB_ID if embedded else None,
            "model_type": s.model_config.model_type,
            "family": s.family,
            "attention": getattr(getattr(trainer.model, "config", None), "_attn_implementation", None),
        },
        "data": {"source": task.data_source, **{f"{n}_examples": len(d) for n, d in s.splits.items()}},
        "versions": _versions(),
        "device": device_info(),
        "launch": launch_facts(s.args),
        "precision": "bf16" if s.args.bf16 else "fp16" if s.args.fp16 else "fp32",
        "frozen_params_in_autocast_dtype": s.frozen_in_autocast_dtype,
        "cpu_dropout_modules": s.cpu_dropouts,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "reduction_percent": 100 * (1 - trainable / total),
        "saved_weights": saved_weights(saved) if saved else None,  # the adapter (PEFT methods) or model on disk
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
