"""The training engine: the transformers Trainer, configured from the run, with the task's evaluation and the
method's hooks plugged in. The same code runs on CPU, one GPU, DDP and DeepSpeed; the launcher decides which.
The overrides of the Trainer's private methods live apart, in launch/run/trainer_internals.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from torch.utils.tensorboard import SummaryWriter
from transformers import (
    EarlyStoppingCallback,
    PreTrainedTokenizerBase,
    PrinterCallback,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback, is_deepspeed_zero3_enabled

from ftctl.config import RunConfig
from launch.run import lm_loss
from launch.run.progress import EVENTS_FILE, EventLog, RichProgress
from launch.run.reliability import (
    GracefulStop,
    StepHealth,
)
from launch.run.trainer_internals import TrainerInternals, earlier_training
from methods.base import Method
from tasks.base import GENERATION_PREFIX, ScoresChoices, Task, TrainsOnOtherBatches

if TYPE_CHECKING:  # annotations only
    from transformers import TrainingArguments


class DropKeys:
    """Wraps a collator: drops dataset columns that are for the sampler, not the model (`length`)."""

    def __init__(self, collator: Any, keys: tuple[str, ...] = ("length",)):
        self.collator = collator
        self.keys = keys

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return self.collator([{k: v for k, v in f.items() if k not in self.keys} for f in features])


def batch_collator(task: Task, tokenizer: PreTrainedTokenizerBase, training: bool, cuda: bool) -> DropKeys:
    """The collator of evaluation batches, or of training batches (packed for decoders with --packing), padded to
    multiples of 8 on GPU (tensor-core friendly shapes), without the columns that are not model inputs."""
    make = task.train_collator if training and isinstance(task, TrainsOnOtherBatches) else task.collator
    return DropKeys(make(tokenizer, 8 if cuda else None), ("length", *task.extra_columns))


class FtctlTrainer(TrainerInternals):
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
        self.loss_choice = lm_loss.for_run(task, method, torch.cuda.is_available(), is_deepspeed_zero3_enabled())
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

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        self._train_began = time.time()
        if isinstance(resume_from_checkpoint, str):
            self.earlier_train_s = earlier_training(Path(resume_from_checkpoint))
            finished = None if is_deepspeed_zero3_enabled() else self.finished_at(Path(resume_from_checkpoint))
            if finished is not None:
                return finished
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_seconds(self) -> float:
        """Training time of every session of the run so far, evaluations inside the loop left out."""
        return self.earlier_train_s + time.time() - self._train_began - self.eval_seconds

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """The stock step, plus what ftctl watches, all on the device (no host sync: launch/run/reliability.py)."""
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
