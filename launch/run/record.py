"""What a run directory records, in one place: `spec.json` (what the run is, copied into every checkpoint),
`run.json` (the finished run: config, versions, launch, cost, metrics; written last), the model card (`README.md`),
`config.yaml` (the options again, for `ftctl train --config`) and `predictions.jsonl`.

Cost numbers measure what they name: `train_runtime_s` is the time spent in training steps, without the
evaluations done during training (`eval_runtime_s` holds those and the final scoring) and without start-up,
loading and saving (`wall_time_s` is the whole process).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from transformers import PreTrainedTokenizerBase, TrainingArguments

from ftctl.errors import FtctlError
from ftctl.models import EMBEDDED_HUB_ID, EMBEDDED_NAME, is_embedded
from launch.run import rundir, tracking
from launch.run.card import model_card
from launch.run.console import console, show_metrics
from launch.run.planning.measure import compare
from launch.run.runs import Run
from launch.run.scoring import score
from launch.run.trainer import FtctlTrainer
from launch.run.trainer_internals import ties
from methods.base import saved_weights, trained_modules
from tasks.base import LoadedData, Prompted, Task

NOT_REPEATED = ("output_dir", "overwrite", "resume", "resume_from")  # config.yaml repeats the run elsewhere


@dataclass
class Clock:
    """Where the process's time went: training (the Trainer's loop, evaluations inside it subtracted by the
    trainer's own count), final scoring, and the whole process."""

    started: float = field(default_factory=time.time)
    train_loop_s: float = 0.0
    scoring_s: float = 0.0

    @contextmanager
    def training(self) -> Iterator[None]:
        began = time.time()
        try:
            yield
        finally:
            self.train_loop_s = time.time() - began

    @contextmanager
    def scoring(self) -> Iterator[None]:
        began = time.time()
        try:
            yield
        finally:
            self.scoring_s = time.time() - began


@dataclass
class Scores:
    """The final evaluation: validation metrics, their details and per-example predictions; test metrics."""

    metrics: dict[str, Any]
    details: dict[str, Any]
    predictions: Any
    test_metrics: dict[str, Any] | None

    @classmethod
    def of(cls, trainer: FtctlTrainer, task: Task, encoded: dict[str, datasets.Dataset]) -> Scores:
        metrics, details, predictions = score(trainer, task, encoded["validation"])
        test = score(trainer, task, encoded["test"])[0] if "test" in encoded else None
        return cls(metrics, details, predictions, test)


@dataclass
class Facts:
    """What the training process knows at the end, for run.json."""

    run: Run
    args: TrainingArguments
    tokenizer: PreTrainedTokenizerBase
    data: LoadedData
    model: torch.nn.Module
    speed_ups: dict[str, int]
    counts: tuple[int, int]  # (trainable, total) parameters as training started
    result: Any  # the Trainer's TrainOutput
    trainer: FtctlTrainer
    tokens: dict[str, Any]  # token slots, real tokens and padding fraction (FtctlTrainer.token_counts)
    plan: tuple[Any, Any] = (None, None)  # the prediction and the CPU allocation probe (launch/plan.py)


def tracker(run: Run, run_dir: Path) -> tracking.MlflowRun | None:
    """The MLflow run's recorder, when the run reports to MLflow."""
    if "mlflow" not in run.cfg.report_to:
        return None
    task = run.task
    tags = {"ftctl.task": task.name, "ftctl.preset": task.preset_name, "ftctl.model": run.model_ref,
            "ftctl.method": run.method.variant, "ftctl.seed": str(run.cfg.seed)}  # fmt: skip
    return tracking.MlflowRun(run.flat(), tags, run_dir)


def spec(run: Run) -> dict[str, Any]:
    """spec.json: what the run is, enough to evaluate or resume a checkpoint."""
    return {
        "config": run.flat(),
        "explicit": run.explicit,
        "task_state": dict(run.task.state),
        "model_ref": run.model_ref,
    }


def check_resumable(run: Run, checkpoint: Path) -> None:
    """Refuse a checkpoint of a run with another task, method, model, DeepSpeed config or adapter shape."""
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


def commit(facts: Facts, scores: Scores, clock: Clock, staging: Path, run_dir: Path) -> dict[str, Any]:
    """Write the final files into `staging`, move them into the run directory, then write run.json (last: its
    presence means the run completed). Main process only."""
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle the Trainer adds; run.json has it all
    tidy_adapter_config(staging, facts.run.model_ref, facts.model)
    facts.tokenizer.save_pretrained(str(staging))
    run_record = run_json(facts, scores, clock, staging)
    (staging / "README.md").write_text(model_card(run_record), encoding="utf-8")
    repeat = {k: v for k, v in run_record["config"].items() if k not in NOT_REPEATED}
    (staging / "config.yaml").write_text(yaml.safe_dump(repeat, sort_keys=False), encoding="utf-8")
    rows = facts.run.task.prediction_rows(facts.data.splits["validation"], scores.predictions)
    rundir.write_jsonl(staging / "predictions.jsonl", rows)
    rundir.commit(staging, run_dir)
    rundir.write_json(run_dir / rundir.RUN_FILE, run_record)
    show_metrics("validation metrics", scores.metrics)
    kept = kept_checkpoint(facts.trainer.state, facts.args)
    if kept:
        console.print(kept, markup=False)
    if scores.test_metrics:
        show_metrics("test metrics", scores.test_metrics)
    console.print(
        f"[green]done[/] in {run_record['train_runtime_s']:.1f} s of training: "
        f"{run_record['samples_per_second']:.1f} samples/s, peak memory {run_record['peak_memory_mb']:.0f} MB -> "
        f"{run_dir}\nscore it: ftctl evaluate {run_dir} --baseline"
    )
    return run_record


def kept_checkpoint(state: Any, args: Any) -> str | None:
    """Which checkpoint the run ended on and why, when it kept its best one (None otherwise)."""
    step, best, name = state.best_global_step, state.best_metric, args.metric_for_best_model
    if not args.load_best_model_at_end or not step or best is None or not name:
        return None
    key = name if name.startswith("eval_") else f"eval_{name}"
    # the evaluations a checkpoint was kept for (not the one before the first step)
    evaluations = [h for h in state.log_history if isinstance(h.get(key), (int, float)) and h.get("step", 0) > 0]
    tied = [h for h in evaluations if ties(h[key], best)]
    why = f"best {name} {best:.4f}"
    if len(tied) > 1:
        why += f", the lowest validation loss of the {len(tied)} evaluations that tie on it"
    return f"kept step {step} of {state.global_step}: {why}"


def tidy_adapter_config(saved: Path, model_ref: str, model: torch.nn.Module) -> None:
    """Two corrections to the saved `adapter_config.json`, read and written once.

    The base: an adapter names it by the path it was trained from; for the embedded MiniLM (a path inside this
    installation) name its hub id instead, which plain transformers/peft code loads anywhere and ftctl resolves to
    its embedded copy. `modules_to_save`: PEFT adds its own head names for sequence classification (`classifier`,
    `score`), so an adapter of BERT listed `classifier` twice and a `score` it does not have; list each module of
    the model once."""
    config_path = saved / "adapter_config.json"
    if not config_path.is_file():
        return
    config = rundir.read_json(config_path, "adapter config")
    tidy = dict(config)
    if is_embedded(model_ref):
        tidy["base_model_name_or_path"] = EMBEDDED_HUB_ID
    if config.get("modules_to_save"):
        names = [f".{name}." for name, _ in model.named_modules()]
        kept = [m for m in dict.fromkeys(config["modules_to_save"]) if any(f".{m}." in n for n in names)]
        tidy["modules_to_save"] = kept or None
    if tidy != config:
        rundir.write_text(config_path, json.dumps(tidy, indent=2, sort_keys=True) + "\n")


def run_json(facts: Facts, scores: Scores, clock: Clock, saved: Path) -> dict[str, Any]:
    run, method, state = facts.run, facts.run.method, facts.trainer.state
    trainable, total = facts.counts
    costs = cost(facts, clock)
    return {
        "status": "completed",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "config": run.flat(),
        "explicit": run.explicit,
        "task": task_record(facts),
        "method": {
            "name": method.variant,
            "peft": method.is_peft,
            "description": method.summary,
            "trained_modules": trained_modules(facts.model),
            **method.record(facts.model),  # method facts: parameter groups, final ranks, quantization, ...
        },
        "model": model_record(facts),
        "data": {"source": facts.data.source, **{f"{n}_examples": len(d) for n, d in facts.data.splits.items()}},
        "versions": versions(),
        "device": device_info(),
        "launch": {**dataclasses.asdict(run.launch), "distributed_type": distributed_type(facts.args)},
        "precision": "bf16" if facts.args.bf16 else "fp16" if facts.args.fp16 else "fp32",
        **facts.speed_ups,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "reduction_percent": 100 * (1 - trainable / total),
        "saved_weights": saved_weights(saved),  # the adapter (PEFT methods) or model on disk
        **costs,
        # the cost column of a study: training time of every session (a resumed run's earlier ones too) x the
        # processes that trained (a device each on GPUs)
        "device_hours": device_hours(costs["train_runtime_total_s"], run.launch.num_processes),
        "global_step": state.global_step,
        "epochs_completed": state.epoch,
        "best_checkpoint": state.best_model_checkpoint,
        **peak_memory(),
        "plan": compare(*facts.plan, costs["train_runtime_s"]),
        "history": state.log_history,
        "metrics": scores.metrics,
        "metric_details": scores.details,
        "test_metrics": scores.test_metrics,
        **facts.tokens,
        "loss_kernel": {
            "requested": getattr(facts.run.task.opts, "loss_kernel", None),
            "used": facts.trainer.loss_choice.kernel,
            "why": facts.trainer.loss_choice.why,
        },
    }


def task_record(facts: Facts) -> dict[str, Any]:
    run, task = facts.run, facts.run.task
    return {
        "name": task.name,
        "preset": task.preset_name,
        "kind": str(task.kind),
        "state": dict(task.state),
        "auto_model": task.fit.auto_model,
        "pipeline_tag": task.fit.pipeline_tag,
        "load_args": task.load_args(run.model_config),
        **({"prompt": task.prompt_record(facts.data.splits["train"][0])} if isinstance(task, Prompted) else {}),
    }


def model_record(facts: Facts) -> dict[str, Any]:
    run = facts.run
    embedded = is_embedded(run.model_ref)
    return {
        "name_or_path": run.model_ref,
        "display": EMBEDDED_NAME if embedded else run.model_ref,
        "hub_id": EMBEDDED_HUB_ID if embedded else None,
        "model_type": run.model_config.model_type,
        "family": str(run.family),
        "attention": getattr(getattr(facts.trainer.model, "config", None), "_attn_implementation", None),
    }


def device_hours(train_seconds: float, processes: int) -> float:
    """The cost column of a study: training time x the processes that trained (one device each on GPUs)."""
    return train_seconds * processes / 3600


def cost(facts: Facts, clock: Clock) -> dict[str, Any]:
    """Training time without the evaluations inside the training loop; throughput over that time."""
    evaluating = facts.trainer.eval_seconds
    training = max(clock.train_loop_s - evaluating, 1e-9)
    metrics = facts.result.metrics
    samples = (metrics.get("train_samples_per_second") or 0.0) * (metrics.get("train_runtime") or 0.0)
    tokens = facts.tokens.get("train_real_tokens") or 0  # counted on the device by ftctl: this session's tokens
    return {
        "train_runtime_s": training,
        "train_runtime_total_s": facts.trainer.earlier_train_s + training,  # with a resumed run's earlier sessions
        "eval_runtime_s": evaluating + clock.scoring_s,
        "wall_time_s": time.time() - clock.started,
        "train_samples": samples,
        "samples_per_second": samples / training,
        "tokens_per_second": tokens / training,
        "train_tokens": tokens,
    }


def distributed_type(args: TrainingArguments) -> str:
    """How accelerate ran the processes (no, multi_cpu, multi_gpu, deepspeed, ...), as it says itself."""
    state = args.distributed_state
    return str(state.distributed_type).split(".")[-1].lower() if state is not None else "no"


def versions() -> dict[str, str]:
    out = {}
    for package in ("ftctl", "torch", "transformers", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def device_info() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {
        "type": "cpu",
        "name": f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)",
        "count": 1,
    }


def peak_memory() -> dict[str, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": rss, "peak_cuda_allocated_mb": cuda, "peak_memory_mb": cuda if cuda is not None else rss}
