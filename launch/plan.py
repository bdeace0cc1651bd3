"""Predicted peak memory and time of a training run, before any weight is read (`ftctl plan`, grids, run.json).

The prediction is not a formula of parameter counts: the run's own model is built from its config on fake tensors
(`FakeTensorMode`: shapes and dtypes, no storage, no weights read), its own method applied to it (LoRA, prefix,
adapters, freezing: the real code), and one real training step traced on the longest micro-batch of its own
training data, collated as training collates it: forward under the run's autocast, its loss (the lean LM loss
where training uses it), backward (with gradient checkpointing where asked), clipping and the optimizer step,
twice where gradients accumulate. torch's `MemTracker` follows every tensor the step allocates and frees and
gives the peak with its parts: weights, gradients, optimizer states, activations (with the logits and the loss)
and temporaries. `FlopCounterMode` counts the step's FLOPs.

What the trace on this machine's CPU cannot see is added from the launch: ZeRO sharding over the processes (and
CPU offload), DDP's gradient buckets, bitsandbytes' 4/8-bit storage of the quantized layers (the trace holds them
in the compute dtype) and the de-quantized copy of one layer that a quantized product makes. Time is the step's
FLOPs over a device rate: one measured here (a matrix product in the training dtype) or one stated (`--tflops`).

`accelerate estimate-memory` and DeepSpeed's estimators count weights and optimizer states only; the activations,
logits and temporaries they leave out are most of the peak for short-sequence encoders and for LM vocabularies.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ftctl.errors import FtctlError, warn
from ftctl.facts import LaunchFacts
from ftctl.models import skeletons
from launch import engine, lm_loss, rundir, runs
from launch.config import resolve_values

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Shape:
    """What one process computes per micro-step."""

    micro_batch: int
    accumulation: int
    processes: int
    precision: str  # fp32, bf16 or fp16 (autocast)
    device: str  # the device the run trains on: cpu or cuda
    length: int = 0  # the longest training batch's sequence length (tokens per row), set by `predict`


@dataclasses.dataclass
class Prediction:
    """Per process, in MiB; `parts` sum to `peak_mb`."""

    shape: Shape
    parts: dict[str, float]
    peak_mb: float
    offloaded_mb: float  # held in CPU memory by DeepSpeed offload, not on the device
    trainable: int
    frozen: int
    quantized: int  # parameters stored in 4 or 8 bits
    logits_mb: float  # the largest logits tensor of the step (informational: part of activations)
    flops_per_step: float  # one optimizer step, all processes
    tokens_per_step: int
    steps: int | None
    rate_tflops: float | None  # per process
    rate_source: str
    notes: list[str]

    @property
    def step_seconds(self) -> float | None:
        if not self.rate_tflops:
            return None
        return self.flops_per_step / self.shape.processes / (self.rate_tflops * 1e12)

    @property
    def train_seconds(self) -> float | None:
        if self.step_seconds is None or self.steps is None:
            return None
        return self.step_seconds * self.steps

    def record(self) -> dict[str, Any]:
        """What run.json and grid.json keep."""
        return {
            "peak_memory_mb": round(self.peak_mb, 1),
            "parts_mb": {k: round(v, 1) for k, v in self.parts.items()},
            "offloaded_mb": round(self.offloaded_mb, 1),
            "logits_mb": round(self.logits_mb, 1),
            "parameters": {"trainable": self.trainable, "frozen": self.frozen, "quantized": self.quantized},
            "shape": dataclasses.asdict(self.shape),
            "flops_per_step": self.flops_per_step,
            "tokens_per_step": self.tokens_per_step,
            "steps": self.steps,
            "rate_tflops": self.rate_tflops,
            "rate_source": self.rate_source,
            "step_seconds": self.step_seconds,
            "train_seconds": self.train_seconds,
            "notes": self.notes,
        }


# ---- the traced step --------------------------------------------------------------------------------------------
def _to_fake(model: torch.nn.Module, mode: Any) -> None:
    """Give the model built on the meta device fake CPU tensors of the same shapes and dtypes (shared parameters
    stay shared), in place: what the traced step runs on."""
    converter = mode.fake_tensor_converter
    made: dict[int, Any] = {}
    cpu = torch.device("cpu")
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None:
                    continue
                if id(t) not in made:
                    fake = converter.from_meta_and_device(mode, t.detach(), cpu)
                    made[id(t)] = (
                        torch.nn.Parameter(fake, t.requires_grad) if isinstance(t, torch.nn.Parameter) else fake
                    )
                store[name] = made[id(t)]


def _autocast(shape: Shape) -> Any:
    if shape.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if shape.precision == "bf16" else torch.float16)


def _optimizer(run: runs.Run, model: torch.nn.Module, args: Any) -> torch.optim.Optimizer:
    """The optimizer the Trainer would build (the method's parameter groups where it has them)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    groups = run.method.param_groups(model, args, decay)
    if groups is None:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in trainable if n in decay], "weight_decay": args.weight_decay},
            {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
        ]
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)  # type: ignore[arg-type]
    return cls([g for g in groups if g["params"]], **kwargs)


def _step(run: runs.Run, model: Any, optimizer: Any, batch: dict, shape: Shape, loss: Any) -> None:
    """One optimizer step as FtctlTrainer takes it: micro-steps (forward under autocast, loss, backward), clipping,
    the update, gradients released."""
    for _ in range(min(shape.accumulation, 2)):  # the second micro-step already holds the first one's gradients
        with _autocast(shape):
            value = loss(model, batch)
        value.backward()
    if run.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], run.cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _NoHook:
    def remove(self) -> None:
        pass


def _tracker(model: torch.nn.Module, optimizer: Any) -> Any:
    """torch's MemTracker, made to follow a whole training step: it refuses a top-level module called a second time
    in one forward pass (its per-module statistics would mix two calls), and a step calls them again: the model in
    a second micro-step, the output layer once per chunk of the lean LM loss. Only the step's peak is used here, so
    such a module's statistics start over instead. Frozen parameters, on which it cannot hook gradients, are
    marked as hooked."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepTracker(MemTracker):
        def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
            again = module in self.memory_tracking and not self._mod_tracker.is_bw
            if again and set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)} == {"Global"}:
                del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

    tracker = StepTracker()
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    tracker.track_external(model, optimizer)
    return tracker


def _traced(run: runs.Run, model: Any, optimizer: Any, batch: dict[str, Any], shape: Shape, loss: Any) -> Any:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # and the optimizer's states exist from this first step on
        _step(run, model, optimizer, batch, shape, loss)
    tracker = _tracker(model, optimizer)
    with tracker:
        _step(run, model, optimizer, batch, shape, loss)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    micro_steps = min(shape.accumulation, 2)
    return {str(getattr(k, "value", k)): v for k, v in peak.items()}, counter.get_total_flops() / micro_steps


# ---- what the trace cannot see ------------------------------------------------------------------------------------
def _quantized_weights(model: torch.nn.Module, quantization: Any) -> dict[int, int]:
    """id -> number of parameters of the weights bitsandbytes would quantize: the linear layers outside the modules
    it keeps in full precision (transformers' rule for `llm_int8_skip_modules`)."""
    from transformers.pytorch_utils import Conv1D

    if quantization is None:
        return {}
    keep = list(getattr(quantization, "llm_int8_skip_modules", None) or [])
    out: dict[int, int] = {}
    for name, module in model.named_modules():
        if type(module) not in (torch.nn.Linear, Conv1D):
            continue
        if any(name == k or f"{k}." in f"{name}." for k in keep):
            continue
        out[id(module.weight)] = module.weight.numel()
    return out


def _compute_like_bitsandbytes(model: torch.nn.Module, quantized: dict[int, int], quantization: Any) -> None:
    """The layers bitsandbytes would quantize compute as its layers do: the input cast to the compute dtype (bf16
    for NF4, fp16 for LLM.int8()), the product in it, the output cast back; so the trace keeps the activations
    they keep. Their weights are held in that dtype here and counted at their 4/8-bit size afterwards."""
    if not quantized:
        return
    dtype = getattr(quantization, "bnb_4bit_compute_dtype", None) if quantization.load_in_4bit else torch.float16
    dtype = dtype or torch.bfloat16

    inputs: dict[int, torch.dtype] = {}

    def cast_in(module: torch.nn.Module, args: tuple) -> tuple:
        inputs[id(module)] = args[0].dtype
        return (args[0].to(dtype), *args[1:])

    def cast_out(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(inputs[id(module)])

    for module in model.modules():
        if id(getattr(module, "weight", None)) in quantized:
            module.to(dtype).requires_grad_(False)  # on the meta device: the same parameters, converted
            module.register_forward_pre_hook(cast_in)
            module.register_forward_hook(cast_out)


def quantized_bytes(numel: int, bits: int) -> float:
    """bitsandbytes storage: NF4 packs two values a byte, with one absmax per 64 values double-quantized to 8 bits
    (and one fp32 constant per 256 of those); LLM.int8() stores a byte a value and one fp32 scale per row (rows
    are at least 64 wide in any model, so at most 1/16 byte a value: counted as such)."""
    if bits == 4:
        return numel / 2 + numel / 64 + numel / 64 / 256 * 4
    return numel + numel / 16


def _launch_parts(parts: dict[str, float], launch: LaunchFacts, largest_layer: float) -> tuple[dict[str, float], float]:
    """The traced single-process parts as each process of the launch holds them, and what DeepSpeed offloads."""
    n = max(1, launch.num_processes)
    stage = launch.deepspeed_stage or 0
    offloaded = 0.0
    if launch.deepspeed_stage is None and n > 1:
        parts["ddp buckets"] = parts["gradients"]  # DDP reduces gradients through bucket copies of them
    if stage >= 1:
        parts["optimizer"] /= n
    if stage >= 2:
        parts["gradients"] /= n
    if stage >= 3:
        parts["weights"] /= n
        parts["zero-3 gathered layers"] = 2 * largest_layer  # the layer computed and the one prefetched
    if launch.deepspeed_offload:
        offloaded = parts["optimizer"]
        parts["optimizer"] = 0.0
    return parts, offloaded


def shape_of(run: runs.Run, device: str | None = None) -> Shape:
    """The run's micro-step as its launch runs it; `device` plans for another device than this machine's."""
    device = device or run.launch.device
    micro, accum = engine.batch_geometry(run.cfg, run.launch.num_processes)
    if device == run.launch.device:
        flags = engine.precision_flags(run.cfg, run.launch, run.model_config.model_type)
        precision = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"
    else:  # planning a GPU run from here: auto means bf16 (every GPU ftctl plans for has it)
        precision = "bf16" if run.cfg.precision == "auto" else run.cfg.precision
    return Shape(micro, accum, run.launch.num_processes, precision, device)


def longest_batch(task: Any, tokenizer: Any, encoded: Any, size: int, device: str) -> dict[str, torch.Tensor]:
    """The training micro-batch with the longest examples, collated as training on `device` collates it."""
    import numpy as np

    lengths = np.asarray(encoded["length"])
    rows = encoded.select(np.argsort(-lengths, kind="stable")[:size].tolist())
    batch = engine.batch_collator(task, tokenizer, True, device == "cuda")([rows[i] for i in range(len(rows))])
    batch = {k: v for k, v in batch.items() if not k.startswith(engine.GENERATION_PREFIX)}
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and bool(mask.all()):
        # transformers looks at a real mask and skips an all-ones one (then attention runs without a mask, in less
        # memory); fake tensors have no values to look at, so the trace is given what that check would find
        del batch["attention_mask"]
    return batch


def _loss_kernel(run: runs.Run, device: str) -> str:
    kernel = engine.loss_choice(run.task, run.method, device == "cuda").kernel
    return "chunked" if kernel == "fused" else kernel  # the fused kernel runs on CUDA only


def _loss(kernel: str, shape: Shape, positions: torch.Tensor | None) -> Any:
    """The training loss of a fake batch, as FtctlTrainer computes it: the model's own, or the lean LM loss on the
    labelled `positions`, found in the real batch (fake tensors hold no labels to find them from)."""
    if positions is None:
        return lambda model, inputs: model(**inputs).loss

    def lean(model: Any, inputs: dict[str, Any]) -> Any:
        rest = {k: v for k, v in inputs.items() if k != "labels"}
        return lm_loss.causal_lm_loss(
            model, rest, inputs["labels"], None, kernel, autocast=lambda: _autocast(shape), positions=positions
        )

    return lean


def _skeleton(run: runs.Run, tokenizer: Any, shape: Shape, ctx: Any) -> tuple[Any, dict[int, int], Any]:
    """The run's model on the meta device, as training would build it (the method applied, checkpointing, the
    frozen layers in the autocast dtype); the weights bitsandbytes would quantize (id -> parameters); its config."""
    from ftctl.models import load_kwargs
    from methods.base import frozen_linears_to

    kwargs = {**load_kwargs(run.cfg), **run.method.load_kwargs(ctx)}
    quantization = kwargs.pop("quantization_config", None)
    kwargs.pop("device_map", None)
    model: Any
    with skeletons(), torch.device("meta"):
        model = run.task.build_model(run.model_ref, tokenizer, kwargs)
        quantized = _quantized_weights(model, quantization)
        _compute_like_bitsandbytes(model, quantized, quantization)
        model = run.method.apply(model, run.task, ctx)
        if run.cfg.gradient_checkpointing and not getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if shape.precision != "fp32" and not run.launch.deepspeed and run.method.frozen_weights_in_autocast_dtype:
            frozen_linears_to(model, torch.bfloat16 if shape.precision == "bf16" else torch.float16)
    model.train()
    return model, quantized, quantization


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
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import TrainingArguments

    from ftctl.facts import DataFacts

    batch = longest_batch(run.task, tokenizer, encoded, shape.micro_batch, shape.device)
    shape = dataclasses.replace(shape, length=int(batch["input_ids"].shape[-1]))
    # a copy of the method: `apply` may keep what it built (AdaLoRA's model, LLRD's groups); the run's own must not
    # hold the skeleton's
    run = dataclasses.replace(run, method=copy.copy(run.method))
    model, quantized, quantization = _skeleton(run, tokenizer, shape, run.context(DataFacts(len(encoded), steps or 1)))
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    traced_quantized = sum(p.numel() * p.element_size() for p in params if id(p) in quantized)
    largest = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in model.modules())
    args = TrainingArguments(
        output_dir="plan", learning_rate=run.cfg.learning_rate or 1e-4, weight_decay=run.cfg.weight_decay, use_cpu=True
    )
    kernel = _loss_kernel(run, shape.device)
    lean = kernel != "plain" and "labels" in batch
    positions = lm_loss.labelled_positions(batch["labels"]) if lean else None
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        _to_fake(model, mode)
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = _loss(kernel, shape, None if positions is None else mode.from_tensor(positions))
        traced, flops = _traced(run, model, _optimizer(run, model, args), fake, shape, loss)
    parts = {
        "weights": traced.get("Parameter", 0) + traced.get("Buffer", 0),
        "gradients": traced.get("Gradient", 0),
        "optimizer": traced.get("Optstate", 0),
        "activations": traced.get("Activation", 0) + traced.get("Temp", 0) + traced.get("Other", 0),
    }
    notes = []
    bits = 4 if getattr(quantization, "load_in_4bit", False) else 8 if quantization is not None else None
    if bits:
        parts["weights"] += sum(quantized_bytes(n, bits) for n in quantized.values()) - traced_quantized
        parts["de-quantized layer"] = max(quantized.values(), default=0) * (2 if shape.precision != "fp32" else 4)
        notes.append(f"{len(quantized)} linear layers stored in {bits} bits")
    parts, offloaded = _launch_parts({k: v / MiB for k, v in parts.items()}, run.launch, largest / MiB)
    tokens = int(batch["input_ids"].numel()) if "input_ids" in batch else 0
    vocab = getattr(run.model_config, "vocab_size", 0) if run.task.fit.auto_model.endswith("LM") else 0
    rate = _rate(run, shape, tokens, tflops)
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


# ---- the device rate ----------------------------------------------------------------------------------------------
def measured_rate(device: str, precision: str, tokens: int, hidden: int, inner: int, seconds: float = 0.3) -> float:
    """TFLOP/s of the run's own typical matrix product (its micro-batch's tokens x hidden size, times the hidden x
    feed-forward weight) in the training dtype on this machine's device, one process: small models on short batches
    reach a small fraction of a device's peak, and this sees it."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(max(tokens, 1), hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, inner, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm up (and wait for the device)
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        c = a @ b
        done += 1
    c.sum().item()
    return 2 * a.shape[0] * hidden * inner * done / (time.perf_counter() - began) / 1e12


def _rate(run: runs.Run, shape: Shape, tokens: int, stated: float | None) -> tuple[float | None, str]:
    if stated:
        return stated, "stated (--tflops)"
    if shape.device != run.launch.device:
        return None, f"not measured: planning for {shape.device} on a {run.launch.device} machine; give --tflops"
    config = run.model_config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 768)
    inner = int(getattr(config, "intermediate_size", 0) or getattr(config, "d_ff", 0) or 4 * hidden)
    rate = measured_rate(shape.device, shape.precision, tokens, hidden, inner)
    return rate, f"measured here: {shape.precision} product of the micro-batch's tokens x {hidden} x {inner}"


# ---- what the run measures ---------------------------------------------------------------------------------------
def _live_bytes(model: torch.nn.Module, optimizer: Any) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type == "cpu"}
    return sum(storages.values())


def window_peak(events: list[dict[str, Any]]) -> int:
    """The most CPU memory allocated at once during a profiler window, over what was allocated when it began, from
    the trace's memory events. Their running total is c10's process-wide count of blocks allocated while any
    profiler recorded memory: a block allocated in an earlier window and freed after it stays counted, so the
    total at the window's start is subtracted."""
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), key=lambda e: e["ts"]
    )
    if not memory:
        return 0
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in memory) - start)


class AllocationProbe(TrainerCallback):
    """The measured side of the prediction on the CPU, where torch keeps no allocator statistics: the allocator's
    peak over one optimizer step shaped as the planned one (micro-batches of the longest length, after the first
    step, so that the optimizer's states exist), from the profiler's memory events, plus what was alive when the
    step began (weights, buffers, optimizer states). On CUDA the run's `max_memory_allocated` is the measure."""

    def __init__(self, shape: Shape):
        self.shape = shape
        self.armed = False
        self.profiler: Any = None
        self.live = 0
        self.measured_mb: float | None = None
        self.seconds = 0.0

    def see_batches(self, batches: list[dict[str, Any]], global_step: int) -> None:
        """FtctlTrainer hands over each optimizer step's micro-batches before the step begins."""
        if self.measured_mb is not None or self.profiler is not None or global_step < 1:
            return
        wanted = (self.shape.micro_batch, self.shape.length)
        self.armed = any(tuple(b["input_ids"].shape) == wanted for b in batches if "input_ids" in b)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.armed:
            return
        from torch.profiler import ProfilerActivity, profile

        self.armed = False
        self.live = _live_bytes(kwargs["model"], kwargs.get("optimizer"))
        self.seconds = time.perf_counter()
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.profiler is None:
            return
        self.profiler.stop()
        with tempfile.NamedTemporaryFile(suffix=".json") as trace:
            self.profiler.export_chrome_trace(trace.name)
            events = json.loads(Path(trace.name).read_text(encoding="utf-8"))["traceEvents"]
        self.measured_mb = (self.live + window_peak(events)) / MiB
        self.profiler = None
        self.seconds = time.perf_counter() - self.seconds


def attempt(run: runs.Run, tokenizer: Any, encoded: Any, steps: int) -> Prediction | None:
    """The run's own prediction (`--plan`): a user error it meets (a method's refusal) is the run's own, raised as
    training would raise it; what the tracer cannot follow is said in a warning, and the run trains on."""
    try:
        shape = shape_of(run)
        return predict(run, tokenizer, encoded, shape, steps)
    except FtctlError:
        raise
    except Exception as exc:  # noqa: BLE001  a model or method the tracer cannot follow: say so, train anyway
        warn(f"no memory and time prediction for this run ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
        return None


def _error(measured: float | None, predicted: float | None) -> float | None:
    return measured / predicted - 1 if measured and predicted else None


def compare(prediction: Prediction | None, probe: AllocationProbe | None, train_seconds: float) -> dict | None:
    """run.json's `plan`: the prediction, what the run measured, and the relative errors (measured / predicted - 1).
    The profiled step (CPU) is slower than the others: training time is compared without it."""
    if prediction is None:
        return None
    steps = prediction.steps or 0
    if probe is not None and probe.measured_mb is not None and steps > 1:
        train_seconds = (train_seconds - probe.seconds) * steps / (steps - 1)
    if torch.cuda.is_available():
        measured: float | None = torch.cuda.max_memory_allocated() / MiB
        how = "torch.cuda.max_memory_allocated over the run (this process)"
    elif probe is not None and probe.measured_mb is not None:
        measured = probe.measured_mb
        how = (
            "CPU: torch allocations over one optimizer step of the planned shape (profiler memory events, "
            f"{probe.seconds:.1f} s) plus the tensors alive when it began"
        )
    else:
        measured, how = None, "not measured: no optimizer step after the first had the planned (longest) shape"
    return {
        "predicted": prediction.record(),
        "measured": {"peak_memory_mb": measured, "how": how, "train_seconds": train_seconds},
        "error": {
            "peak_memory": _error(measured, prediction.peak_mb),
            "train_time": _error(train_seconds, prediction.train_seconds),
        },
    }


# ---- fitting a GPU, and what would make a run fit ----------------------------------------------------------------
CUDA_CONTEXT_MB = 512.0  # the CUDA context and kernels: in the GPU's memory, not in torch's allocation statistics
FRAGMENTATION = 1.10  # the caching allocator reserves more than it hands out; 10% is a common margin


def parse_size(text: str) -> float:
    """A memory size (`16GiB`, `16GB`, `24000MiB`, `16` = GiB) in MiB."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise FtctlError(f"--gpu-memory {text!r} is not a size; write e.g. 16GiB, 24GB or 81920MiB")
    value, unit = float(match.group(1)), (match.group(2) or "GiB").upper().rstrip("B").rstrip("I")
    factor = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0**2}[unit]
    si = match.group(2) and "I" not in match.group(2).upper()  # GB: 10^9 bytes
    return value * factor * (1000 / 1024) ** {"K": 1, "M": 2, "G": 3, "T": 4}[unit] if si else value * factor


def needed_mb(prediction: Prediction) -> float:
    """What the run needs of a GPU: the predicted allocation with the allocator's margin, and the CUDA context."""
    return gpu_need_mb(prediction.peak_mb)


def gpu_need_mb(peak_mb: float) -> float:
    """What a process whose allocation peaks at `peak_mb` needs of a GPU (its margin and CUDA context added)."""
    return peak_mb * FRAGMENTATION + CUDA_CONTEXT_MB


def remedies(run: runs.Run) -> Iterator[tuple[str, dict[str, Any]]]:
    """Changes that lower peak memory without changing what is learnt, gentlest first: gradient checkpointing,
    smaller micro-batches (accumulating to the same batch), then 4-bit QLoRA for LoRA-family runs."""
    cfg = run.cfg
    values: dict[str, Any] = {}
    if not cfg.gradient_checkpointing:
        values["gradient_checkpointing"] = True
        yield "--gradient-checkpointing", dict(values)
    micro, _ = engine.batch_geometry(cfg, run.launch.num_processes)
    while micro > 1:
        micro //= 2
        values.update(micro_batch_size=micro, gradient_accumulation_steps=None)
        yield f"--gradient-checkpointing --micro-batch-size {micro}", dict(values)
    if run.method.variant in ("lora", "rslora", "dora"):
        yield f"--method qlora --gradient-checkpointing --micro-batch-size {micro}", {**values, "method": "qlora"}


def suggestion(run: runs.Run, tokenizer: Any, encoded: Any, limit_mb: float, device: str) -> str:
    """The first remedy whose prediction fits `limit_mb`, or why none does."""
    base = {k: v for k, v in run.flat().items() if k in run.explicit}
    for flags, change in remedies(run):
        try:
            changed = runs.load(resolve_values({**base, **change}), run.launch, model=run.model_ref)
        except FtctlError:
            continue
        changed = dataclasses.replace(changed, task=changed.task.bind(state=run.task.state, tokenizer=tokenizer))
        guess = predict(changed, tokenizer, encoded, shape_of(changed, device))
        if needed_mb(guess) <= limit_mb:
            return f"fits with {flags} (needs {needed_mb(guess) / 1024:.1f} GiB)"
    return (
        "no single-GPU setting fits: use more GPUs with DeepSpeed ZeRO-3 (--deepspeed zero3_offload_params_optimizer)"
    )


# ---- ftctl plan ---------------------------------------------------------------------------------------------------
def prepared(run: runs.Run) -> tuple[runs.Run, Any, Any, int]:
    """The run bound to its tokenizer and training data as training binds it, its tokenized training split (from
    the same cache training reads) and the optimizer steps it will take."""
    run, tokenizer, _, encoded = runs.with_data(run, ("train",))
    return (
        run,
        tokenizer,
        encoded["train"],
        engine.total_steps(run.cfg, run.launch.num_processes, len(encoded["train"])),
    )


SHORT = {"weights": "weights", "gradients": "grads", "optimizer": "optim", "activations": "activ"}


def row(label: str, prediction: Prediction, limit_mb: float | None, advice: str = "") -> dict[str, Any]:
    """One line of the plan table (and of `ftctl plan --json`); memory in MiB per process."""
    shape = prediction.shape
    seconds = prediction.train_seconds
    fits = None if limit_mb is None else needed_mb(prediction) <= limit_mb
    out: dict[str, Any] = {
        "run": label,
        "batch": f"{shape.micro_batch}x{shape.accumulation}x{shape.processes}",
        "tokens": shape.length,
        **{SHORT.get(k, k): round(v, 1) for k, v in prediction.parts.items()},
        "peak": round(prediction.peak_mb, 1),
        "time": "-" if seconds is None else time.strftime("%H:%M:%S", time.gmtime(seconds)),
    }
    if fits is not None:
        out.update(fits="yes" if fits else "no", advice=advice)
    return {**out, "prediction": prediction.record()}


def show(rows: list[dict[str, Any]], limit_mb: float | None) -> None:
    from rich.table import Table

    from launch.console import console

    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "prediction"]
    table = Table(title="ftctl plan: peak memory per process (MiB) and training time, predicted")
    for column in columns:
        table.add_column(column, justify="left" if column in ("run", "advice", "batch") else "right")
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in columns))
    console.print(table)
    console.print("batch: micro-batch x accumulation x processes; tokens: the longest batch's length", markup=False)
    if limit_mb is not None:
        console.print(
            f"fits: peak x {FRAGMENTATION} (allocator margin) + {CUDA_CONTEXT_MB:.0f} MiB (CUDA context) <= "
            f"{limit_mb / 1024:.1f} GiB",
            markup=False,
        )


def plan_options(prog: str) -> Any:
    from ftctl.options import Parser

    parser = Parser(prog=prog, add_help=False)
    parser.add_argument("--gpu-memory", metavar="SIZE", help="GPU memory per process (16GiB): which runs fit")
    parser.add_argument("--tflops", type=float, metavar="X", help="device rate per process (default: measured here)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="plan for this device (default: this machine's)")
    parser.add_argument("--json", metavar="FILE", help="also write the predictions to FILE")
    return parser


def checked(opts: dict[str, Any]) -> dict[str, Any]:
    """The plan options checked, with `limit_mb` (from --gpu-memory, or None) for what follows."""
    if opts["tflops"] is not None and opts["tflops"] <= 0:
        raise FtctlError(f"--tflops must be positive, got {opts['tflops']}")
    if opts["json"] and not Path(opts["json"]).resolve().parent.is_dir():
        raise FtctlError(f"--json {opts['json']}: its folder does not exist; create it or give another path")
    return {**opts, "limit_mb": parse_size(opts["gpu_memory"]) if opts["gpu_memory"] else None}


def plan_run(run: runs.Run, label: str, opts: dict[str, Any]) -> dict[str, Any]:
    """One run's table row: its prediction, whether it fits `--gpu-memory`, and if not, what would."""
    run, tokenizer, encoded, steps = prepared(run)
    limit = opts["limit_mb"]
    device = opts["device"] or ("cuda" if limit is not None else run.launch.device)
    try:
        prediction = predict(run, tokenizer, encoded, shape_of(run, device), steps, opts["tflops"])
    except Exception as exc:  # noqa: BLE001  an operation fake tensors cannot run (a data-dependent check)
        return {"run": label, "advice": f"not predicted: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    advice = ""
    if limit is not None and needed_mb(prediction) > limit:
        advice = suggestion(run, tokenizer, encoded, limit, device)
    return row(label, prediction, limit, advice)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """`ftctl plan [train options]`: one run's predicted peak memory and time; nothing is loaded but configs,
    tokenizer and data."""
    from launch.quiet import quiet, quiet_transformers

    quiet()
    quiet_transformers()
    argv = list(sys.argv[1:] if argv is None else argv)
    known, rest = plan_options("ftctl plan").parse_known_args(argv)
    opts = checked(vars(known))
    run = runs.from_argv(rest, "ftctl plan")
    rows = [plan_run(run, f"{run.cfg.task} / {run.method.variant}", opts)]
    finish(rows, opts)
    return rows


def finish(rows: list[dict[str, Any]], opts: dict[str, Any]) -> None:
    show(rows, opts["limit_mb"])
    if opts["json"]:
        rundir.write_json(Path(opts["json"]), rows)


if __name__ == "__main__":
    from ftctl.errors import run_main

    sys.exit(run_main(main))
