"""The run's options as the Trainer's `TrainingArguments`: the batch geometry (global batch = micro batch x
accumulation x processes), checkpointing, evaluation and saving, and the checks that the launch is one group."""

from __future__ import annotations

import inspect
import math
import os
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    TrainingArguments,
)

from ftctl.config import RunConfig
from ftctl.errors import FtctlError
from ftctl.facts import LaunchFacts
from launch.run import configs
from launch.run.precision import precision_flags, use_liger
from tasks._metrics import higher_is_better
from tasks.base import Task

if TYPE_CHECKING:  # annotations only
    from transformers import TrainingArguments


def launched_world_size() -> int:
    """How many processes the launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def batch_geometry(cfg: RunConfig, world: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) so that micro x accumulation x processes = global batch."""
    if cfg.micro_batch_size and cfg.gradient_accumulation_steps:
        micro, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
        if micro * accum * world != cfg.batch_size:
            raise FtctlError(
                f"--micro-batch-size {micro} x --gradient-accumulation-steps {accum} x {world} process(es) = "
                f"{micro * accum * world}, not --batch-size {cfg.batch_size}; give two of the three"
            )
        return micro, accum
    if cfg.gradient_accumulation_steps:
        accum = cfg.gradient_accumulation_steps
        if cfg.batch_size % (accum * world):
            raise FtctlError(
                f"--batch-size {cfg.batch_size} is not divisible by --gradient-accumulation-steps "
                f"{accum} x {world} process(es)"
            )
        return cfg.batch_size // (accum * world), accum
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    if cfg.batch_size % (micro * world):
        raise FtctlError(
            f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size {micro} x {world} process(es)"
        )
    return micro, cfg.batch_size // (micro * world)


def best_metric(cfg: RunConfig, task: Task) -> tuple[str, bool]:
    metric = cfg.metric_for_best_model or task.primary_metric
    if metric not in (*task.metrics, "loss"):
        raise FtctlError(
            f"--metric-for-best-model '{metric}' is not reported by task '{task.preset_name}'; "
            f"choose one of: {', '.join((*task.metrics, 'loss'))}"
        )
    return metric, higher_is_better(metric)


def checkpointing_flags(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing in the installed Trainer's words: `activation_checkpointing` in newer transformers
    (5.23 has it), `gradient_checkpointing` in older ones (5.17, which GPU images ship); non-reentrant either way."""
    kwargs = {"use_reentrant": False} if enabled else None
    if "activation_checkpointing" in inspect.signature(TrainingArguments.__init__).parameters:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}


def training_arguments(cfg: RunConfig, task: Task, output_dir: str, launch: LaunchFacts) -> TrainingArguments:
    world = launched_world_size()
    micro, accum = batch_geometry(cfg, world)
    metric, greater = best_metric(cfg, task)
    load_best = loads_best(cfg)
    others = [r for r in cfg.report_to if r not in ("tensorboard", "none")]
    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=cfg.eval_batch_size or 2 * micro,
        gradient_accumulation_steps=accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        **precision_flags(cfg, launch, task.fit.model_type),
        **checkpointing_flags(cfg.gradient_checkpointing),
        eval_strategy=cfg.eval_strategy,
        eval_on_start=cfg.eval_on_start and cfg.eval_strategy != "no",
        eval_steps=cfg.eval_steps,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        load_best_model_at_end=load_best,
        metric_for_best_model=metric,
        greater_is_better=greater,
        report_to=others or "none",
        disable_tqdm=True,
        remove_unused_columns=False,  # our datasets hold exactly the model inputs, labels and `length`
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        dataloader_num_workers=cfg.dataloader_workers,
        # ftctl counts tokens itself, on the device (FtctlTrainer.training_step); the Trainer's own count gathers
        # and reads a number across processes at every micro-step, and its NaN filter reads the loss at every
        # micro-step: host syncs the GPU step does without (launch/run/reliability.py watches non-finite losses)
        include_num_input_tokens_seen="no",
        logging_nan_inf_filter=False,
        use_cpu=not torch.cuda.is_available(),  # without it, CPU processes of one launch would each train alone
        torch_compile=cfg.compile,
        use_liger_kernel=use_liger(cfg),
        deepspeed=configs.deepspeed_config(cfg.deepspeed),
        ddp_timeout=cfg.ddp_timeout,
    )
    try:
        return TrainingArguments(**settings)
    except ValueError as exc:  # the settings were checked above; what is left is the launch environment
        raise refused_settings(exc, world) from None


def loads_best(cfg: RunConfig) -> bool:
    """Whether the run ends on its best checkpoint, checked against how it saves."""
    load_best = cfg.load_best_model_at_end and cfg.eval_strategy != "no"
    if load_best and cfg.save_strategy != cfg.eval_strategy:
        raise FtctlError(
            f"picking the best checkpoint needs --save-strategy equal to --eval-strategy "
            f"({cfg.save_strategy} vs {cfg.eval_strategy}); or pass --no-load-best-model-at-end"
        )
    if load_best and cfg.save_strategy == "steps" and (cfg.save_steps or 0) % (cfg.eval_steps or 1):
        raise FtctlError(
            f"--save-steps {cfg.save_steps} must be a multiple of --eval-steps {cfg.eval_steps} to pick "
            "the best checkpoint"
        )
    return load_best


def refused_settings(exc: ValueError, world: int) -> FtctlError:
    """TrainingArguments' refusal, in one line: most often a process that is not part of the group it was told of."""
    reason = str(exc).strip().splitlines()[0]
    if world > 1:
        return FtctlError(
            f"the environment says WORLD_SIZE={world} but this process cannot join a distributed group "
            f"({reason}); the processes are not one distributed group. Launch with `ftctl train --num-processes "
            "N` or `accelerate launch --multi_gpu --num_processes N` (which runs on the CPU too)"
        )
    return FtctlError(f"invalid training settings: {reason}")


def total_steps(cfg: RunConfig, world: int, train_examples: int) -> int:
    """Optimizer steps the run will take on `world` processes, as the Trainer counts them (for schedules set up
    before training, and the planner)."""
    if cfg.max_steps:
        return cfg.max_steps
    micro, accum = batch_geometry(cfg, world)
    batches = math.ceil(train_examples / (micro * world))
    per_epoch = max(batches // accum, 1)
    return math.ceil(cfg.epochs * per_epoch)


def check_world(args: TrainingArguments) -> None:
    """Refuse a launch whose processes do not form one group (e.g. `accelerate launch --cpu --num_processes 2`
    starting a single process, or processes that each train alone)."""
    launched = launched_world_size()
    world = args.world_size
    if world > 1 and getattr(args, "hf_deepspeed_config", None) is not None:
        import deepspeed  # deferred: a heavy import (seconds), paid only by the runs that use it

        # ZeRO-3 partitions weights while they load (zero.Init), which asks DeepSpeed's own communicator for the
        # world size; on CPU, accelerate initialised torch.distributed but not that communicator.
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
    if world != launched:
        raise FtctlError(
            f"the launcher set WORLD_SIZE={launched} but this process sees {args.world_size} process(es); the "
            "processes are not one distributed group. Launch with `ftctl train --num-processes N` or "
            "`accelerate launch --multi_gpu --num_processes N` (which runs on the CPU too)"
        )
