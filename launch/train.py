"""Fine-tune: `python -m launch.train`, `accelerate launch -m launch.train` and `ftctl train` all run `main`.

The story (`main`): load and check the run, where every user error is raised before anything is written; load the
data, the tokenizer and the model, and apply the method (`setup`); open the run directory; train with the Trainer;
score the validation (and test) split; stage the final model and record the run, `run.json` last (launch/run/record.py).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from rich.panel import Panel
from rich.text import Text
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ftctl.errors import FtctlError, run_main, warn
from ftctl.facts import DataFacts
from ftctl.models import load_kwargs
from launch.run import record, rundir, runs
from launch.run.arguments import check_world, total_steps, training_arguments
from launch.run.config import default_output_dir
from launch.run.console import console, show_pairs
from launch.run.dropout import use_cpu_dropout
from launch.run.launcher import RESUME_PROG
from launch.run.planning.measure import AllocationProbe, attempt, probed
from launch.run.planning.prediction import Prediction
from launch.run.quiet import quiet, quiet_transformers
from launch.run.reliability import GracefulStop, RunStopped
from launch.run.scoring import sort_by_length
from launch.run.trainer import FtctlTrainer, build_trainer
from methods.base import frozen_linears_to, parameter_counts
from tasks.base import LoadedData, Prompted


@dataclass
class Setup:
    """A run ready to train: everything checked and loaded, nothing written yet."""

    run: runs.Run
    args: TrainingArguments
    tokenizer: PreTrainedTokenizerBase
    data: LoadedData
    encoded: dict[str, datasets.Dataset]
    model: torch.nn.Module
    resume_checkpoint: str | None
    speed_ups: dict[str, int]  # frozen_params_in_autocast_dtype, cpu_dropout_modules (see `speed_ups`)
    counts: tuple[int, int]  # (trainable, total) parameters as training starts (AdaLoRA prunes some away later)
    prediction: Prediction | None  # peak memory and time predicted before the weights were read (--plan)
    probe: AllocationProbe | None  # measures the planned step's CPU allocation peak (CUDA keeps statistics)


def main(argv: list[str] | None = None, prog: str = "python -m launch.train") -> dict[str, Any]:
    """Run one fine-tuning job; returns the validation metrics."""
    clock = record.Clock()
    quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    s = setup(argv, prog)  # every user error is raised by now, and nothing is written
    main_process = s.args.process_index == 0
    if main_process:
        show_pairs("ftctl train", banner(s))
        show_prompt(s)  # prompted tasks: the first example exactly as the model reads it

    run_dir = open_run_dir(s)  # from here on, the run directory is written
    validation = sort_by_length(s.encoded["validation"])[0]  # evaluation in length order: less padding
    tracker = record.tracker(s.run, run_dir)  # MLflow: options, tags and final metrics beside the Trainer's logs
    trainer = build_trainer(
        s.run.cfg,
        s.args,
        s.run.task,
        s.run.method,
        s.model,
        s.tokenizer,
        s.encoded["train"],
        validation,
        run_dir,
        tuple(t for t in (tracker, s.probe) if t is not None),
    )
    with clock.training(), probed(s.probe):  # the probe's profiled window ends with training, whatever ends it
        result = trainer.train(resume_from_checkpoint=s.resume_checkpoint)
    raise_if_stopped(trainer, argv, prog)  # a signal: the checkpoint is written; say how to continue

    with clock.scoring():
        scores = record.Scores.of(trainer, s.run.task, s.encoded)
    tokens = trainer.token_counts()  # a collective: every process takes part
    staging = rundir.staging_dir(run_dir) if main_process else run_dir / rundir.STAGING
    trainer.accelerator.wait_for_everyone()
    s.run.method.save(trainer, str(staging))  # every process takes part: ZeRO-3 gathers the weights
    if main_process:
        done = (result, trainer, tokens, (s.prediction, s.probe))
        facts = record.Facts(s.run, s.args, s.tokenizer, s.data, s.model, s.speed_ups, s.counts, *done)
        record.commit(facts, scores, clock, staging, run_dir)
        if tracker is not None:
            tracker.finish(scores.metrics, scores.test_metrics)
    trainer.accelerator.wait_for_everyone()
    leave_process_group()
    return scores.metrics


def setup(argv: list[str], prog: str = "python -m launch.train") -> Setup:
    """Resolve and check everything; load data, tokenizer and model; apply the method. Writes nothing."""
    run = runs.from_argv(argv, prog)
    cfg = run.cfg
    cfg.output_dir = cfg.output_dir or default_output_dir(cfg)
    rundir.check_target(cfg.output_dir, cfg.overwrite, bool(cfg.resume or cfg.resume_from))
    resume_checkpoint = resume_point(run)

    quiet_transformers()
    args = training_arguments(cfg, run.task, cfg.output_dir, run.launch)
    check_world(args)
    # The main process reads (hub downloads land in the datasets cache) and tokenizes first; the others then find
    # both in the caches instead of repeating the work (and `--ddp-timeout` bounds how long they wait).
    with args.main_process_first(desc="loading and tokenizing the data"):
        run, tokenizer, data, encoded = runs.with_data(run)
    task = run.task
    steps = total_steps(cfg, args.world_size, len(encoded["train"]))
    ctx = run.context(DataFacts(len(encoded["train"]), steps))
    planned = cfg.plan and args.process_index == 0 and not run.launch.deepspeed  # ZeRO-3 builds collectively
    prediction = attempt(run, tokenizer, encoded["train"], steps) if planned else None

    set_seed(cfg.seed)
    kwargs = {**load_kwargs(cfg), **run.method.load_kwargs(ctx)}
    model = run.method.apply(task.build_model(run.model_ref, tokenizer, kwargs), task, ctx)
    counts = parameter_counts(model)
    ups = speed_ups(model, args, run)
    probe = AllocationProbe(prediction.shape) if prediction and prediction.shape.device == "cpu" else None
    return Setup(run, args, tokenizer, data, encoded, model, resume_checkpoint, ups, counts, prediction, probe)


def speed_ups(model: torch.nn.Module, args: TrainingArguments, run: runs.Run) -> dict[str, int]:
    """Changes to the model that make training faster and change no result: the frozen linear layers stored in
    the autocast dtype (methods.base.frozen_linears_to; not under DeepSpeed, whose ZeRO-3 cannot partition mixed
    dtypes together), and on the CPU the dropout that draws 16 random bits per element (launch.run.dropout;
    FTCTL_CPU_DROPOUT=0 keeps torch's). Measured in bench/results/cpu_kernels.md."""
    converted = dropouts = 0
    if (args.bf16 or args.fp16) and not run.launch.deepspeed and run.method.frozen_weights_in_autocast_dtype:
        converted = frozen_linears_to(model, torch.bfloat16 if args.bf16 else torch.float16)
    if args.use_cpu and os.environ.get("FTCTL_CPU_DROPOUT", "1") != "0":  # use_cpu: no CUDA (engine)
        dropouts = use_cpu_dropout(model)
    return {"frozen_params_in_autocast_dtype": converted, "cpu_dropout_modules": dropouts}


def banner(s: Setup) -> list[tuple[str, Any]]:
    """What the run is, printed before it starts."""
    cfg, task, args = s.run.cfg, s.run.task, s.args
    trainable, total = s.counts
    return [
        ("task", f"{task.preset_name} ({task.name})"),
        ("method", s.run.method.variant),
        ("model", f"{cfg.model or 'embedded MiniLM'} ({s.run.model_config.model_type}, {s.run.family})"),
        ("data", f"{s.data.source}: " + ", ".join(f"{n} {len(d):,}" for n, d in s.data.splits.items())),
        ("trainable", f"{trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)"),
        (
            "batch",
            f"{cfg.batch_size} = {args.per_device_train_batch_size} per step x "
            f"{args.gradient_accumulation_steps} accumulation x {args.world_size} process(es)",
        ),
        ("learning rate", cfg.learning_rate),
        ("output", cfg.output_dir),
        *([("resuming from", s.resume_checkpoint)] if s.resume_checkpoint else []),
    ]


def show_prompt(s: Setup) -> None:
    """A prompted task's first training example as the model reads it, and the target it learns after it."""
    if not isinstance(s.run.task, Prompted):
        return
    prompt = s.run.task.prompt_record(s.data.splits["train"][0])
    end = prompt["end_of_answer"] if prompt["mode"] != "seq2seq" else ""
    text = prompt["first_example"]["prompt"] + prompt["first_example"]["target"] + end
    title = f"prompt ({prompt['mode']}; the answer ends with {prompt['end_of_answer']})"
    console.print(Panel(Text(text), title=title, title_align="left", expand=False))


def open_run_dir(s: Setup) -> Path:
    """Create (or, resuming, keep) the run directory and write its spec, which every checkpoint copies."""
    run_dir = Path(str(s.run.cfg.output_dir))
    with s.args.main_process_first(desc="preparing the output directory"):
        if s.args.process_index == 0:
            rundir.prepare(str(run_dir), overwrite=s.run.cfg.overwrite and not s.resume_checkpoint)
            rundir.write_json(run_dir / rundir.SPEC_FILE, record.spec(s.run))
    return run_dir


def leave_process_group() -> None:
    """Shut the distributed process group down before the interpreter does: left to interpreter exit, gloo's worker
    threads are sometimes still joinable when their C++ destructors run, and the process dies with "terminate called
    without an active exception" (exit 1) after a run that succeeded (seen with DeepSpeed ZeRO-3 on 2 CPU
    processes)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def raise_if_stopped(trainer: FtctlTrainer, argv: list[str], prog: str) -> None:
    """After a signal, the Trainer has written a checkpoint and stopped: say where it is and how to continue."""
    stopper = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GracefulStop))
    if stopper.received is None:
        return
    trainer.accelerator.wait_for_everyone()
    checkpoint = get_last_checkpoint(trainer.args.output_dir)
    prog = os.environ.get(RESUME_PROG) or prog  # launched by `ftctl train --num-processes N ...`: that command
    again = shlex.join([*shlex.split(prog), *[a for a in argv if a not in ("--overwrite", "--resume")], "--resume"])
    raise RunStopped(
        f"{signal.Signals(stopper.received).name} received: stopped after step {trainer.state.global_step} with a "
        f"checkpoint in {checkpoint}; continue with: {again}",
        stopper.received,
    )


def resume_point(run: runs.Run) -> str | None:
    """The checkpoint to continue from (`--resume`: the newest complete one in --output-dir; damaged ones are skipped,
    saying so), checked against this run: a checkpoint of a run with another task, method, model or adapter shape is
    refused, and so is a run that already finished (its run.json is never rewritten)."""
    cfg = run.cfg
    out = Path(str(cfg.output_dir))
    if (cfg.resume or cfg.resume_from) and (out / rundir.RUN_FILE).is_file():
        raise FtctlError(
            f"--resume: the run in {out} already finished (it has {rundir.RUN_FILE}) and is never rewritten; score it "
            "with ftctl evaluate, or train again into a new --output-dir"
        )
    if cfg.resume_from:
        checkpoint = Path(cfg.resume_from)
        if not checkpoint.is_dir():
            raise FtctlError(f"--resume-from: checkpoint directory not found: {cfg.resume_from}")
        problem = rundir.checkpoint_problem(checkpoint)
        if problem:
            raise FtctlError(f"--resume-from: {checkpoint} is damaged ({problem}); resume from another checkpoint")
    elif cfg.resume:
        good, bad = rundir.complete_checkpoints(out) if out.is_dir() else ([], [])
        if not good:
            damaged = f" ({len(bad)} damaged: {bad[0][0].name}, {bad[0][1]})" if bad else ""
            raise FtctlError(
                f"--resume: no checkpoint in {cfg.output_dir} to continue from{damaged}; drop --resume to start anew"
            )
        checkpoint = good[0]
        for skipped, problem in bad:
            if int(skipped.name.split("-")[-1]) > int(checkpoint.name.split("-")[-1]):
                warn(f"skipping {skipped} ({problem}); resuming from the newest complete checkpoint, {checkpoint.name}")
    else:
        return None
    record.check_resumable(run, checkpoint)
    return str(checkpoint)


def exit_worker(code: int) -> None:
    """End a launched training process. One of several (WORLD_SIZE > 1) leaves without the interpreter's teardown:
    gloo's and DeepSpeed's worker threads may still be joinable when their C++ destructors run there, and the
    process then dies with "terminate called without an active exception" (exit 1) after a run that succeeded (seen
    with ZeRO-3 on 2 CPU processes even after the process group is destroyed). Everything is written by now
    (run.json is fsynced); only the streams need flushing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_worker(run_main(main))
