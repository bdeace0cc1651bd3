"""Scoring a model on a split: the examples a saved run is scored on, and a Trainer's predictions on them (sorted by
length for less padding, back in the split's order). `ftctl evaluate`, `ftctl merge` and `ftctl export` score here."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ftctl.errors import FtctlError
from launch.run.runs import Run
from launch.run.trainer import FtctlTrainer, build_trainer
from tasks.base import SamplesGenerations, Task


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


@dataclass
class Scored:
    metrics: dict[str, Any]
    details: dict[str, Any]
    predictions: Any
    seconds: float
    task: Task  # as it scored (a few-shot baseline's carries its examples): its prediction rows show its prompts
    label_names: list[str]  # the batch keys the scoring Trainer read labels from


def evaluation_data(run: Run, data_file: str | None, split: str | None) -> tuple[datasets.Dataset, str]:
    """The examples to score and where they come from: --data, else the run's test (or validation) split."""
    task, cfg = run.task, run.cfg
    if data_file:
        raw = task.read_file(data_file, "evaluation data")
        if cfg.max_eval_samples:
            raw = raw.select(range(min(len(raw), cfg.max_eval_samples)))
        split, source = "evaluation", data_file
    else:
        data = task.load()
        split = split or ("test" if "test" in data.splits else "validation")
        if split not in data.splits:
            raise FtctlError(f"the run's data has no {split} split; pass --data FILE")
        raw, source = data.splits[split], f"{data.source} ({split})"
    task.check_data({split: raw}, training=False)
    return raw, source


def score_model(
    run: Run,
    args: Any,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    encoded: datasets.Dataset,
    label_names: list[str] | None = None,
) -> Scored:
    """Score `model` on the encoded examples. `label_names`: the batch keys that hold labels, for a model whose
    forward does not name them (an ONNX graph run behind a module: launch/run/exporting.py)."""
    trainer = build_trainer(run.cfg, args, run.task, run.method, model, tokenizer, None, None)
    if label_names is not None:
        trainer.label_names = label_names
    started = time.time()
    metrics, details, predictions = score(trainer, run.task, encoded)
    return Scored(metrics, details, predictions, time.time() - started, run.task, trainer.label_names)
