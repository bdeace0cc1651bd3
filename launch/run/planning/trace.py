"""The traced step: the run's model on fake tensors, one real optimizer step followed by torch's MemTracker."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer

from launch.run import runs
from launch.run.planning.prediction import Shape


def to_fake(model: torch.nn.Module, mode: Any) -> None:
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


def autocast_for(shape: Shape) -> Any:
    if shape.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if shape.precision == "bf16" else torch.float16)


def optimizer_for(run: runs.Run, model: torch.nn.Module, args: Any) -> torch.optim.Optimizer:
    """The optimizer the Trainer would build (the method's parameter groups where it has them)."""
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


def one_step(run: runs.Run, model: Any, optimizer: Any, batch: dict, shape: Shape, loss: Any) -> None:
    """One optimizer step as FtctlTrainer takes it: micro-steps (forward under autocast, loss, backward), clipping,
    the update, gradients released."""
    for _ in range(min(shape.accumulation, 2)):  # the second micro-step already holds the first one's gradients
        with autocast_for(shape):
            value = loss(model, batch)
        value.backward()
    if run.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], run.cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class NoHook:
    def remove(self) -> None:
        pass


def memory_tracker(model: torch.nn.Module, optimizer: Any) -> Any:
    """torch's MemTracker, made to follow a whole training step: it refuses a top-level module called a second time
    in one forward pass (its per-module statistics would mix two calls), and a step calls them again: the model in
    a second micro-step, the output layer once per chunk of the lean LM loss. Only the step's peak is used here, so
    such a module's statistics start over instead. Frozen parameters, on which it cannot hook gradients, are
    marked as hooked."""

    class StepTracker(MemTracker):
        def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
            again = module in self.memory_tracking and not self._mod_tracker.is_bw
            if again and set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)} == {"Global"}:
                del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

    tracker = StepTracker()
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (NoHook(), NoHook())
    tracker.track_external(model, optimizer)
    return tracker


def traced_step(run: runs.Run, model: Any, optimizer: Any, batch: dict[str, Any], shape: Shape, loss: Any) -> Any:
    with FlopCounterMode(display=False) as counter:  # and the optimizer's states exist from this first step on
        one_step(run, model, optimizer, batch, shape, loss)
    tracker = memory_tracker(model, optimizer)
    with tracker:
        one_step(run, model, optimizer, batch, shape, loss)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    micro_steps = min(shape.accumulation, 2)
    return {str(getattr(k, "value", k)): v for k, v in peak.items()}, counter.get_total_flops() / micro_steps
