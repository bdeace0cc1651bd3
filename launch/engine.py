"""The training engine: the transformers Trainer, configured from the run, with the task's evaluation and the
method's hooks plugged in. The same code runs on CPU, one GPU, DDP and DeepSpeed; the launcher decides which.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from transformers import (
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback, is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import TrainOutput

from ftctl import device
from ftctl.config import RunConfig
from ftctl.errors import FtctlError
from ftctl.facts import LaunchFacts
from ftctl.models import FP16_UNSAFE
from ftctl.vocab import Family
from launch import configs, lm_loss, rundir
from launch.progress import EVENTS_FILE, EventLog, RichProgress
from launch.reliability import (
    EpochSeededLengthGroupedSampler,
    GracefulStop,
    StepHealth,
    write_checkpoint_atomically,
)
from methods.base import Method
from tasks.base import SamplesGenerations, ScoresChoices, Task, TrainsOnOtherBatches

if TYPE_CHECKING:  # annotations only
    from transformers import TrainerControl, TrainerState, TrainingArguments

LOWER_IS_BETTER = ("loss", "perplexity", "mse", "rmse", "mae")


def higher_is_better(metric: str) -> bool:
    """The direction of a metric, for choosing the best checkpoint, the best search trial and the best method."""
    return metric not in LOWER_IS_BETTER


GENERATION_PREFIX = "generation_"  # batch keys holding the prompt to generate from (decoders), not model inputs


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), where bf16 autocast is faster
    than fp32; elsewhere bf16 on the CPU is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(launch: LaunchFacts, model_type: str | None = None) -> str:
    """What `--precision auto` means on this machine for this run.

    CUDA: bf16 where the GPU supports it; on GPUs without bf16 (T4, V100) fp16 with loss scaling, except for the
    model types fp16 overflows in (T5: fp32). CPU: bf16 autocast on CPUs with native bf16 and without DeepSpeed,
    measured faster at the same accuracy there (bench/RESULTS.md, perf_cpu: LoRA 1.2x, full fine-tuning 1.3x the fp32
    samples/s on SST-2, equal dev accuracy); fp32 everywhere else. FTCTL_CPU_BF16=0 keeps the CPU at fp32 (the test
    suite does, so that its exact comparisons mean the same on every machine).
    """
    bf16 = device.cuda_bf16()
    if bf16 is not None:
        if bf16:
            return "bf16"
        return "fp32" if model_type in FP16_UNSAFE else "fp16"
    wanted = os.environ.get("FTCTL_CPU_BF16", "1") != "0"
    if wanted and not launch.deepspeed and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def precision_flags(cfg: RunConfig, launch: LaunchFacts, model_type: str | None = None) -> dict[str, bool]:
    bf16 = device.cuda_bf16()
    precision = auto_precision(launch, model_type) if cfg.precision == "auto" else cfg.precision
    if precision == "fp16" and bf16 is None:
        raise FtctlError("--precision fp16 needs a CUDA GPU; on CPU use fp32 or bf16")
    if precision == "bf16" and bf16 is False:
        raise FtctlError("this GPU does not support bf16; use --precision fp16 (what auto picks here) or fp32")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def use_liger(cfg: RunConfig) -> bool:
    """Liger kernels: asked for (then they must be usable), or by default when installed and on CUDA."""
    usable = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if cfg.liger_kernel and not usable:
        raise FtctlError("--liger-kernel needs a CUDA GPU and the liger-kernel package (pip install ftctl[gpu])")
    return usable if cfg.liger_kernel is None else cfg.liger_kernel


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
        # micro-step: host syncs the GPU step does without (launch/reliability.py watches non-finite losses)
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
        reason = str(exc).strip().splitlines()[0]
        if world > 1:
            raise FtctlError(
                f"the environment says WORLD_SIZE={world} but this process cannot join a distributed group "
                f"({reason}); the processes are not one distributed group. Launch with `ftctl train --num-processes "
                "N` or `accelerate launch --multi_gpu --num_processes N` (which runs on the CPU too)"
            ) from None
        raise FtctlError(f"invalid training settings: {reason}") from None


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


class DropKeys:
    """Wraps a collator: drops dataset columns that are for the sampler, not the model (`length`)."""

    def __init__(self, collator: Any, keys: tuple[str, ...] = ("length",)):
        self.collator = collator
        self.keys = keys

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.collator([{k: v for k, v in f.items() if k not in self.keys} for f in features])


def loss_choice(task: Task, method: Method, cuda: bool) -> lm_loss.LossChoice:
    """The loss a run trains with: the lean LM loss (launch/lm_loss.py) for decoder LM tasks where the method
    allows it, else the model's own."""
    return lm_loss.choose(
        str(getattr(task.opts, "loss_kernel", "plain")),
        task.fit.loss_counts_items and task.fit.family == Family.DECODER,
        method.plain_loss_reason(),
        cuda,
    )


def batch_collator(task: Task, tokenizer: PreTrainedTokenizerBase, training: bool, cuda: bool) -> DropKeys:
    """The collator of evaluation batches, or of training batches (packed for decoders with --packing), padded to
    multiples of 8 on GPU (tensor-core friendly shapes), without the columns that are not model inputs."""
    make = task.train_collator if training and isinstance(task, TrainsOnOtherBatches) else task.collator
    return DropKeys(make(tokenizer, 8 if cuda else None), ("length", *task.extra_columns))


class FtctlTrainer(Trainer):
    """The stock Trainer plus four things: the task scores predictions against the exact split evaluated, the
    method may bring its own parameter groups, evaluation keeps dataset order, and tasks that generate are
    evaluated on generated text (the Seq2SeqTrainer's job, done here for decoders as well; see `prediction_step`)."""

    def __init__(self, *args: Any, task: Task, method: Method, train_collator: Any = None, **kwargs: Any):
        self.task = task
        self.method = method
        self.train_collator = train_collator
        self._scored: Any = None
        self._generating = False
        # token slots computed (a Python count: shapes are known on the host) and real tokens (summed on the device:
        # no host sync per step) in this process's training batches
        self._token_slots = 0
        self._real_tokens: torch.Tensor | int = 0
        self.eval_seconds = 0.0  # time spent in evaluations (during training: not training time)
        self.earlier_train_s = 0.0  # training time of the sessions before a resumed one (its checkpoint's TIME_FILE)
        self._train_began = time.time()
        kwargs.update(compute_metrics=self._metrics, preprocess_logits_for_metrics=self._reduce)
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)
        self.loss_choice = loss_choice(task, method, torch.cuda.is_available())
        stop = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, GracefulStop)), None)
        self.health = stop.health if stop is not None else StepHealth()
        if not task.fit.loss_counts_items:
            # transformers assumes any model whose forward takes **kwargs divides its loss by the number of label
            # items it is given; heads that average per micro-batch (classification, regression, QA, most token
            # classifiers, T5/BART LM losses) then get their loss multiplied by the process count and not divided
            # by the accumulation steps. Saying so restores the mean-loss handling: results independent of the
            # number of processes and of how the global batch is accumulated.
            self.model_accepts_loss_kwargs = False

    def _reduce(self, logits: Any, labels: Any) -> Any:
        return logits if self._generating else self.task.reduce_logits(logits, labels)

    def _metrics(self, prediction: Any) -> dict[str, Any]:
        if self._generating and not self.task.generates:
            return {}  # sample outputs of a task scored without generating: nothing to score
        return self.task.compute_metrics(prediction.predictions, prediction.label_ids, self._scored)

    def evaluate(self, eval_dataset: Any = None, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._scored = eval_dataset if eval_dataset is not None else self.eval_dataset
        self._generating = self.task.generates
        began = time.time()
        try:
            return super().evaluate(eval_dataset, *args, **kwargs)
        finally:
            self._generating = False
            self.eval_seconds += time.time() - began

    def predict(self, test_dataset: Any, *args: Any, generate: bool | None = None, **kwargs: Any) -> Any:
        """`generate`: predictions are generated token ids (default: when the task generates)."""
        self._scored = test_dataset
        self._generating = self.task.generates if generate is None else generate
        try:
            return super().predict(test_dataset, *args, **kwargs)
        finally:
            self._generating = False

    def get_train_dataloader(self) -> Any:
        """Training batches from the task's training collator (packed for decoders with --packing); evaluation and
        generation keep the padded batches of `data_collator`."""
        if self.train_collator is None:
            return super().get_train_dataloader()
        padded, self.data_collator = self.data_collator, self.train_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = padded

    def token_counts(self) -> dict[str, Any]:
        """Input token slots computed in training (padding included), real tokens, and the padding fraction, summed
        over all processes."""
        real = float(self._real_tokens.item()) if isinstance(self._real_tokens, torch.Tensor) else self._real_tokens
        counts = torch.tensor([self._token_slots, real], dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        slots, real = (int(v) for v in counts.tolist())
        return {
            "train_token_slots": slots,
            "train_real_tokens": real,
            "padding_fraction": 1 - real / slots if slots else None,
        }

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        inputs = {k: v for k, v in inputs.items() if not k.startswith(GENERATION_PREFIX)}
        if self.loss_choice.kernel == "plain" or not model.training or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        loss = lm_loss.causal_lm_loss(
            model, inputs, labels, num_items_in_batch, self.loss_choice.kernel, autocast=self.accelerator.autocast
        )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as the stock compute_loss: the token count is the whole step's, gradients are averaged over processes
            loss = loss * self.accelerator.num_processes
        return loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Any, Any, Any]:
        """Scores logits as the stock Trainer does; when generating, also runs `generate` on the prompt alone.

        Decoders generate from `generation_input_ids` (the prompt without the answer, left-padded by the task's
        collator), encoder-decoders from the encoder input only (never `labels` or decoder inputs), so no label
        leaks into what the model sees. The loss is still the teacher-forced loss on the full batch. Under ZeRO-3
        every process must keep calling forward until all are done (`synced_gpus`), or generation hangs.
        """
        prompt = {k[len(GENERATION_PREFIX) :]: inputs.pop(k) for k in list(inputs) if k.startswith(GENERATION_PREFIX)}
        if not self._generating or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        has_labels = all(inputs.get(k) is not None for k in self.label_names)
        loss = super().prediction_step(model, inputs, True, ignore_keys)[0] if has_labels else None
        inputs = self._prepare_inputs(inputs)
        # a transformers or PEFT model: both generate, but transformers types `generate` for its own models only
        generator: Any = self.model
        assert generator is not None
        encoder_decoder = bool(getattr(generator.config, "is_encoder_decoder", False))
        if encoder_decoder:
            prompt = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        else:
            prompt = self._prepare_inputs(prompt)

        kwargs = {"use_cache": True, "synced_gpus": is_deepspeed_zero3_enabled(), **self.task.generation_kwargs()}
        # generate() does not go through the forward accelerate wrapped in autocast; enter it here, in the training
        # precision (frozen weights may be stored in bf16: methods.base.frozen_linears_to)
        with torch.no_grad(), self.accelerator.autocast():
            generated = generator.generate(**prompt, **kwargs)
        # keep the new tokens only: drop the prompt (decoders) or the decoder start token (encoder-decoders)
        generated = generated[:, 1:] if encoder_decoder else generated[:, prompt["input_ids"].shape[1] :]
        labels = inputs.get(self.label_names[0]) if has_labels else None
        if isinstance(self.task, ScoresChoices):  # and each allowed answer scored by its likelihood
            with torch.no_grad(), self.accelerator.autocast():
                scores = self.task.choice_scores(generator, prompt)
            return loss, (generated, scores), labels
        return loss, generated, labels

    def create_optimizer(self, model: torch.nn.Module | None = None) -> Any:
        opt_model = self.model if model is None else model
        assert opt_model is not None
        if self.optimizer is None:
            groups = self.method.param_groups(opt_model, self.args, set(self.get_decay_parameter_names(opt_model)))
            if groups is not None:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)  # type: ignore[arg-type]
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)

    # ---- reliability: see launch/reliability.py ------------------------------------------------------------------
    _checkpoint_root: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        return self._checkpoint_root or super()._get_output_dir(trial)

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._train_began = time.time()
        if isinstance(resume_from_checkpoint, str):
            self.earlier_train_s = earlier_training(Path(resume_from_checkpoint))
            finished = None if is_deepspeed_zero3_enabled() else self._finished_at(Path(resume_from_checkpoint))
            if finished is not None:
                return finished
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _finished_at(self, checkpoint: Path) -> TrainOutput | None:
        """A checkpoint written when training had already taken all its `--max-steps` (the run stopped later, while
        scoring or saving): its weights and state, and no step more. The stock loop, resumed there in the middle of
        an epoch, would take one step past max_steps before it looks."""
        state_file = checkpoint / TRAINER_STATE_NAME
        if self.args.max_steps <= 0 or not state_file.is_file():
            return None
        state = TrainerState.load_from_json(str(state_file))
        if state.global_step < self.args.max_steps:
            return None
        self._load_from_checkpoint(str(checkpoint))
        self.state = state
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        return TrainOutput(state.global_step, losses[-1] if losses else 0.0, {"train_runtime": 0.0})

    def training_seconds(self) -> float:
        """Training time of every session of the run so far, evaluations inside the loop left out."""
        return self.earlier_train_s + time.time() - self._train_began - self.eval_seconds

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        run_dir = self._get_output_dir(trial)

        def save_into(root: str) -> None:
            self._checkpoint_root = root
            try:
                super(FtctlTrainer, self)._save_checkpoint(model, trial)
                if self.args.should_save:  # in the staged checkpoint: promoted with it, atomically
                    checkpoint = Path(root) / f"checkpoint-{self.state.global_step}"
                    rundir.write_json(checkpoint / TIME_FILE, {"train_seconds": self.training_seconds()})
            finally:
                self._checkpoint_root = None

        write_checkpoint_atomically(self, save_into, run_dir)

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """The stock step, plus what ftctl watches, all on the device (no host sync: launch/reliability.py)."""
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if ids is not None:
            self._token_slots += ids.numel()
            self._real_tokens = self._real_tokens + (mask.sum() if mask is not None else ids.numel())
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.health.record(loss, self.state.global_step + 1)  # checked by GracefulStop at the next checked step
        return loss

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The stock fetch of a step's micro-batches; the allocation probe (launch/plan.py) sees their shapes."""
        batches, items = super().get_batch_samples(epoch_iterator, num_batches, device)
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "see_batches"):
                callback.see_batches(batches, self.state.global_step)
        return batches, items

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            # Group by the global batch, not the per-process one: then the processes split exactly the batches one
            # process would see, and results do not depend on the number of processes.
            args = self.args
            global_batch = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
            return EpochSeededLengthGroupedSampler(global_batch, sampler.lengths, args.data_seed or 0)
        return sampler

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        # The stock sampler shuffles evaluation data when training groups by length; we sort evaluation sets by
        # length ourselves (same padding saving) and need predictions back in that order.
        if self.args.world_size <= 1:
            return torch.utils.data.SequentialSampler(eval_dataset)
        return None


TIME_FILE = "ftctl_time.json"  # in each checkpoint: the run's training seconds so far (every session)


def earlier_training(checkpoint: Path) -> float:
    """The training seconds a checkpoint's run had spent when it was written (0 for checkpoints without them)."""
    try:
        return float(json.loads((checkpoint / TIME_FILE).read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


class CopySpec(TrainerCallback):
    """Puts the run spec into every checkpoint, so a checkpoint alone can be evaluated or resumed."""

    def __init__(self, spec_path: Path):
        self.spec_path = spec_path

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                shutil.copy2(self.spec_path, checkpoint / self.spec_path.name)


def build_trainer(
    cfg: RunConfig,
    args: TrainingArguments,
    task: Task,
    method: Method,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset | None,
    eval_dataset: datasets.Dataset | None,
    run_dir: Path | None = None,
    extra_callbacks: tuple[TrainerCallback, ...] = (),
) -> FtctlTrainer:
    callbacks: list[Any] = [RichProgress(), GracefulStop(), *method.callbacks(), *extra_callbacks]
    if run_dir is not None:
        callbacks.append(CopySpec(run_dir / "spec.json"))
        callbacks.append(EventLog(run_dir / EVENTS_FILE))
        if "tensorboard" in cfg.report_to and args.process_index == 0:
            callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    cuda = torch.cuda.is_available()
    return FtctlTrainer(
        model=model,
        args=args,
        data_collator=batch_collator(task, tokenizer, False, cuda),
        train_collator=batch_collator(task, tokenizer, True, cuda) if isinstance(task, TrainsOnOtherBatches) else None,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        task=task,
        method=method,
    )


def sort_by_length(encoded: datasets.Dataset) -> tuple[datasets.Dataset, np.ndarray]:
    """The split sorted by token length (less padding per batch) and the order used."""
    order = np.argsort(np.asarray(encoded["length"]), kind="stable")
    return encoded.select(order.tolist()), order


def score(trainer: FtctlTrainer, task: Task, encoded: datasets.Dataset) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(metrics, details, predictions in the split's original order) for one encoded split."""
    ordered, order = sort_by_length(encoded)
    output = trainer.predict(ordered, metric_key_prefix="eval")
    speed_keys = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")
    measured = {k[len("eval_") :]: v for k, v in output.metrics.items() if k.startswith("eval_")}
    metrics = {k: v for k, v in measured.items() if k not in speed_keys}
    details = {
        **task.metric_details(output.predictions, output.label_ids, ordered),
        "speed": {k: v for k, v in measured.items() if k in speed_keys},
    }
    predictions = task.example_predictions(unsort(output.predictions, order), encoded)
    if isinstance(task, SamplesGenerations) and task.sample_count():  # show what the model writes
        shown = encoded.select(range(min(task.sample_count(), len(encoded))))
        generated = trainer.predict(shown, metric_key_prefix="sample", generate=True).predictions
        predictions = task.add_samples(predictions, generated)
    return metrics, details, predictions


def unsort(predictions: Any, order: np.ndarray) -> Any:
    """Predictions made on `encoded.select(order)`, back in `encoded`'s order."""
    inverse = np.argsort(order)
    if isinstance(predictions, tuple):
        return tuple(p[inverse] for p in predictions)
    return predictions[inverse]
