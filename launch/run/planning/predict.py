"""The prediction of one run: its skeleton, its longest training batch, the traced step and the launch's parts."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import TrainingArguments

from ftctl.facts import DataFacts
from ftctl.models import load_kwargs, skeletons
from launch.run import lm_loss, runs
from launch.run.arguments import batch_geometry
from launch.run.planning.accounting import compute_like_bitsandbytes, launch_parts, quantized_bytes, quantized_weights
from launch.run.planning.prediction import MiB, Prediction, Shape
from launch.run.planning.rate import device_rate
from launch.run.planning.trace import autocast_for, optimizer_for, to_fake, traced_step
from launch.run.precision import precision_flags
from launch.run.trainer import batch_collator
from methods.base import frozen_linears_to
from tasks.base import GENERATION_PREFIX


def shape_of(run: runs.Run, device: str | None = None) -> Shape:
    """The run's micro-step as its launch runs it; `device` plans for another device than this machine's."""
    device = device or run.launch.device
    micro, accum = batch_geometry(run.cfg, run.launch.num_processes)
    if device == run.launch.device:
        flags = precision_flags(run.cfg, run.launch, run.model_config.model_type)
        precision = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"
    else:  # planning a GPU run from here: auto means bf16 (every GPU ftctl plans for has it)
        precision = "bf16" if run.cfg.precision == "auto" else run.cfg.precision
    return Shape(micro, accum, run.launch.num_processes, precision, device)


def longest_batch(task: Any, tokenizer: Any, encoded: Any, size: int, device: str) -> dict[str, torch.Tensor]:
    """The training micro-batch with the longest examples, collated as training on `device` collates it."""
    lengths = np.asarray(encoded["length"])
    rows = encoded.select(np.argsort(-lengths, kind="stable")[:size].tolist())
    batch = batch_collator(task, tokenizer, True, device == "cuda")([rows[i] for i in range(len(rows))])
    batch = {k: v for k, v in batch.items() if not k.startswith(GENERATION_PREFIX)}
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and bool(mask.all()):
        # transformers looks at a real mask and skips an all-ones one (then attention runs without a mask, in less
        # memory); fake tensors have no values to look at, so the trace is given what that check would find
        del batch["attention_mask"]
    return batch


def loss_kernel(run: runs.Run, device: str) -> str:
    kernel = lm_loss.for_run(run.task, run.method, device == "cuda", run.launch.deepspeed_stage == 3).kernel
    return "chunked" if kernel == "fused" else kernel  # the fused kernel runs on CUDA only


def loss_for(kernel: str, shape: Shape, positions: torch.Tensor | None) -> Any:
    """The training loss of a fake batch, as FtctlTrainer computes it: the model's own, or the lean LM loss on the
    labelled `positions`, found in the real batch (fake tensors hold no labels to find them from)."""
    if positions is None:
        return lambda model, inputs: model(**inputs).loss

    def lean(model: Any, inputs: dict[str, Any]) -> Any:
        rest = {k: v for k, v in inputs.items() if k != "labels"}
        return lm_loss.causal_lm_loss(
            model, rest, inputs["labels"], None, kernel, autocast=lambda: autocast_for(shape), positions=positions
        )

    return lean


def skeleton(run: runs.Run, tokenizer: Any, shape: Shape, ctx: Any) -> tuple[Any, dict[int, int], Any]:
    """The run's model on the meta device, as training would build it (the method applied, checkpointing, the
    frozen layers in the autocast dtype); the weights bitsandbytes would quantize (id -> parameters); its config."""
    kwargs = {**load_kwargs(run.cfg), **run.method.load_kwargs(ctx)}
    quantization = kwargs.pop("quantization_config", None)
    kwargs.pop("device_map", None)
    model: Any
    with skeletons(), torch.device("meta"):
        model = run.task.build_model(run.model_ref, tokenizer, kwargs)
        quantized = quantized_weights(model, quantization)
        compute_like_bitsandbytes(model, quantized, quantization)
        model = run.method.apply(model, run.task, ctx)
        if run.cfg.gradient_checkpointing and not getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if shape.precision != "fp32" and not run.launch.deepspeed and run.method.frozen_weights_in_autocast_dtype:
            frozen_linears_to(model, torch.bfloat16 if shape.precision == "bf16" else torch.float16)
    model.train()
    return model, quantized, quantization


def traced_parts(
    run: runs.Run, model: torch.nn.Module, batch: dict[str, Any], shape: Shape, kernel: str
) -> tuple[dict[str, float], float]:
    """Bytes per kind (weights, gradients, optimizer, activations) at the peak of one training step traced on fake
    tensors, and the step's FLOPs."""
    args = TrainingArguments(
        output_dir="plan", learning_rate=run.cfg.learning_rate or 1e-4, weight_decay=run.cfg.weight_decay, use_cpu=True
    )
    lean = kernel != "plain" and "labels" in batch
    positions = lm_loss.labelled_positions(batch["labels"]) if lean else None
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        to_fake(model, mode)
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = loss_for(kernel, shape, None if positions is None else mode.from_tensor(positions))
        traced, flops = traced_step(run, model, optimizer_for(run, model, args), fake, shape, loss)
    parts = {
        "weights": traced.get("Parameter", 0) + traced.get("Buffer", 0),
        "gradients": traced.get("Gradient", 0),
        "optimizer": traced.get("Optstate", 0),
        "activations": traced.get("Activation", 0) + traced.get("Temp", 0) + traced.get("Other", 0),
    }
    return parts, float(flops)


def predict(
    run: runs.Run,
    tokenizer: Any,
    encoded: Any,
    shape: Shape,
    steps: int | None = None,
    tflops: float | None = None,
) -> Prediction:
    """The run's peak memory per process and its time, from one training step traced on fake tensors. `run.task`
    is bound to the tokenizer and the data's state, as training binds it; `encoded` is the tokenized training
    split."""
    batch = longest_batch(run.task, tokenizer, encoded, shape.micro_batch, shape.device)
    shape = dataclasses.replace(shape, length=int(batch["input_ids"].shape[-1]))
    # a copy of the method: `apply` may keep what it built (AdaLoRA's model, LLRD's groups); the run's own must not
    # hold the skeleton's
    run = dataclasses.replace(run, method=copy.copy(run.method))
    model, quantized, quantization = skeleton(run, tokenizer, shape, run.context(DataFacts(len(encoded), steps or 1)))
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    traced_quantized = sum(p.numel() * p.element_size() for p in params if id(p) in quantized)
    largest = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in model.modules())
    kernel = loss_kernel(run, shape.device)
    parts, flops = traced_parts(run, model, batch, shape, kernel)
    notes = []
    bits = 4 if getattr(quantization, "load_in_4bit", False) else 8 if quantization is not None else None
    if bits:
        parts["weights"] += sum(quantized_bytes(n, bits) for n in quantized.values()) - traced_quantized
        parts["de-quantized layer"] = max(quantized.values(), default=0) * (2 if shape.precision != "fp32" else 4)
        notes.append(f"{len(quantized)} linear layers stored in {bits} bits")
    parts, offloaded = launch_parts({k: v / MiB for k, v in parts.items()}, run.launch, largest / MiB)
    tokens = int(batch["input_ids"].numel()) if "input_ids" in batch else 0
    vocab = getattr(run.model_config, "vocab_size", 0) if run.task.fit.auto_model.endswith("LM") else 0
    rate = device_rate(run, shape, tokens, tflops)
    return Prediction(
        shape=shape,
        parts=parts,
        peak_mb=sum(parts.values()),
        offloaded_mb=offloaded,
        trainable=trainable,
        frozen=frozen,
        quantized=sum(quantized.values()),
        logits_mb=tokens * vocab * (4 if shape.precision == "fp32" or kernel == "plain" else 2) / MiB,
        flops_per_step=float(flops) * shape.accumulation * shape.processes,
        tokens_per_step=tokens * shape.accumulation * shape.processes,
        steps=steps,
        rate_tflops=rate[0],
        rate_source=rate[1],
        notes=notes,
    )
