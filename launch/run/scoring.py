"""Scoring a split with a trained Trainer: sorted by length for less padding, predictions back in the split's order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from launch.run.trainer import FtctlTrainer
from tasks.base import SamplesGenerations, Task

if TYPE_CHECKING:  # annotations only
    pass


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
