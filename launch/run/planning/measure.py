"""What the run measures against the prediction: on CUDA the allocator's peak; on the CPU the allocations of one
optimizer step of the planned shape (profiler memory events)."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from ftctl.errors import FtctlError, warn
from launch.run import runs
from launch.run.planning.predict import predict, shape_of
from launch.run.planning.prediction import MiB, Prediction, Shape
from launch.run.quiet import QuietProfiler


def live_bytes(model: torch.nn.Module, optimizer: Any) -> int:
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
        self.quiet = QuietProfiler()

    def see_batches(self, batches: list[dict[str, Any]], global_step: int) -> None:
        """FtctlTrainer hands over each optimizer step's micro-batches before the step begins."""
        if self.measured_mb is not None or self.profiler is not None or global_step < 1:
            return
        wanted = (self.shape.micro_batch, self.shape.length)
        self.armed = any(tuple(b["input_ids"].shape) == wanted for b in batches if "input_ids" in b)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.armed:
            return
        self.armed = False
        self.live = live_bytes(kwargs["model"], kwargs.get("optimizer"))
        self.seconds = time.perf_counter()
        self.quiet.open()
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.profiler is None:
            return
        self.profiler.stop()
        self.quiet.close()
        with tempfile.NamedTemporaryFile(suffix=".json") as trace:
            self.profiler.export_chrome_trace(trace.name)
            events = json.loads(Path(trace.name).read_text(encoding="utf-8"))["traceEvents"]
        self.measured_mb = (self.live + window_peak(events)) / MiB
        self.profiler = None
        self.seconds = time.perf_counter() - self.seconds

    def close(self) -> None:
        """A window that training left open (an error or a second Ctrl-C within the step): closed, and the log's
        descriptor given back."""
        if self.profiler is not None:
            with contextlib.suppress(Exception):
                self.profiler.stop()
            self.profiler = None
        self.quiet.close()


@contextlib.contextmanager
def probed(probe: AllocationProbe | None) -> Iterator[None]:
    """Training under the probe: whatever ends it, the profiled window is closed."""
    try:
        yield
    finally:
        if probe is not None:
            probe.close()


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


def relative_error(measured: float | None, predicted: float | None) -> float | None:
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
            "peak_memory": relative_error(measured, prediction.peak_mb),
            "train_time": relative_error(train_seconds, prediction.train_seconds),
        },
    }
