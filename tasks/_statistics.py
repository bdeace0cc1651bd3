"""Metrics as functions of sums of per-example statistics.

A report resamples evaluation examples (bootstrap intervals, paired comparisons between methods). Averaging a
per-example score is right only for metrics that are averages (accuracy, SQuAD EM/F1, ROUGE); entity F1, macro F1,
Pearson's r and corpus BLEU are not. Each of them is, however, a function of sums over examples: entity F1 of the
counts of true, predicted and gold entities; Pearson's r of five moments; BLEU of n-gram match counts and lengths
(sacreBLEU computes it exactly so, and resamples it so for its own paired bootstrap). So a task turns each row of
its predictions file into a vector of such statistics (`ExampleStatistics.example_statistics`), and any resample
of examples is scored exactly by summing rows and calling `metrics_from_totals`, vectorized over resamples.
`tests/tasks/test_statistics.py` checks every task's totals against the metrics its own evaluation reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's and seqeval's zero_division=0)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    return _ratio(2 * precision * recall, precision + recall)


# ---- classification ------------------------------------------------------------------------------------------------
def class_statistics(gold: Sequence[int], predicted: Sequence[int], classes: int) -> np.ndarray:
    """Per example: [1, correct, tp per class, predicted per class, gold per class]; a prediction outside the label
    set is -1 (wrong, and predicted as no class)."""
    gold_a, pred_a = np.asarray(gold, dtype=int), np.asarray(predicted, dtype=int)
    ids = np.arange(classes)
    is_pred = pred_a[:, None] == ids[None, :]
    is_gold = gold_a[:, None] == ids[None, :]
    return np.concatenate(
        [np.ones((len(gold_a), 1)), (pred_a == gold_a)[:, None], is_pred & is_gold, is_pred, is_gold], axis=1
    ).astype(float)


def class_metrics(totals: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """accuracy and macro precision/recall/F1 over all classes, as scikit-learn computes them with
    `labels=range(classes), average="macro", zero_division=0`."""
    n, correct = totals[..., 0], totals[..., 1]
    tp = totals[..., 2 : 2 + classes]
    predicted = totals[..., 2 + classes : 2 + 2 * classes]
    gold = totals[..., 2 + 2 * classes : 2 + 3 * classes]
    precision, recall = _ratio(tp, predicted), _ratio(tp, gold)
    return {
        "accuracy": _ratio(correct, n),
        "precision": precision.mean(-1),
        "recall": recall.mean(-1),
        "f1": _f1(precision, recall).mean(-1),
    }


# ---- entities (seqeval, default mode) ------------------------------------------------------------------------------
def entity_statistics(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> np.ndarray:
    """Per sentence: [true entities found, predicted entities, gold entities, correct tags, tags]. seqeval's micro
    scores count entities over the whole corpus, whose sentences it joins with an `O` between them, so an entity
    never crosses a sentence and the per-sentence counts add up to its counts."""
    from seqeval.metrics.sequence_labeling import get_entities  # deferred: a heavy import, paid by NER reports only

    rows = []
    for g, p in zip(gold, predicted, strict=True):
        true, found = set(get_entities(list(g))), set(get_entities(list(p)))
        rows.append([len(true & found), len(found), len(true), sum(a == b for a, b in zip(g, p, strict=True)), len(g)])
    return np.asarray(rows, dtype=float).reshape(-1, 5)


def entity_metrics(totals: np.ndarray) -> dict[str, np.ndarray]:
    precision, recall = _ratio(totals[..., 0], totals[..., 1]), _ratio(totals[..., 0], totals[..., 2])
    return {
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "accuracy": _ratio(totals[..., 3], totals[..., 4]),
    }


# ---- regression ---------------------------------------------------------------------------------------------------
def moment_statistics(predicted: Sequence[float], gold: Sequence[float]) -> np.ndarray:
    """Per pair: [1, x, y, x^2, y^2, xy, (x - y)^2] with x the prediction and y the gold score."""
    x, y = np.asarray(predicted, dtype=float), np.asarray(gold, dtype=float)
    return np.stack([np.ones_like(x), x, y, x * x, y * y, x * y, (x - y) ** 2], axis=1)


def moment_metrics(totals: np.ndarray) -> dict[str, np.ndarray]:
    """Pearson's r (0 where either side is constant, as the task reports it) and the mean squared error."""
    n, sx, sy, sxx, syy, sxy, se = (totals[..., i] for i in range(7))
    cov = n * sxy - sx * sy
    var = (n * sxx - sx * sx) * (n * syy - sy * sy)
    scale = np.maximum(n * n * np.maximum(np.abs(sxx), np.abs(syy)), 1.0)  # float noise of a constant series
    constant = var <= 1e-12 * scale * scale
    r = np.divide(cov, np.sqrt(np.where(constant, 1.0, var)), out=np.zeros(np.shape(cov)), where=~constant)
    return {"pearson": np.clip(r, -1.0, 1.0), "mse": _ratio(se, n)}


# ---- means of per-example scores -----------------------------------------------------------------------------------
def mean_statistics(values: dict[str, Sequence[float]]) -> np.ndarray:
    """Per example: [1, value of each metric] (metrics that are averages over examples)."""
    columns = [np.asarray(v, dtype=float) for v in values.values()]
    return np.stack([np.ones_like(columns[0]), *columns], axis=1) if columns else np.zeros((0, 1))


def mean_metrics(totals: np.ndarray, names: Sequence[str], scale: float = 1.0) -> dict[str, np.ndarray]:
    return {name: scale * _ratio(totals[..., 1 + i], totals[..., 0]) for i, name in enumerate(names)}


# ---- sacreBLEU ----------------------------------------------------------------------------------------------------
def sacrebleu_statistics(metric: Any, predictions: list[str], references: list[str]) -> np.ndarray:
    """Per sentence: sacreBLEU's own sufficient statistics for `metric` (a `sacrebleu.BLEU()` or `CHRF()`), the ones
    its paired bootstrap sums."""
    return np.asarray(metric._extract_corpus_statistics(predictions, [references]), dtype=float)


def sacrebleu_scores(metric: Any, totals: np.ndarray) -> np.ndarray:
    """The corpus score from summed statistics, for each resample (a loop: sacreBLEU scores one at a time)."""
    flat = totals.reshape(-1, totals.shape[-1])
    scores = [metric._compute_score_from_stats(list(row)).score for row in flat]
    return np.asarray(scores, dtype=float).reshape(totals.shape[:-1])


def apply_columns(totals: np.ndarray, parts: list[tuple[int, Callable[[np.ndarray], dict[str, np.ndarray]]]]) -> dict:
    """Metrics of a statistics vector made of consecutive parts, each scored by its own function."""
    out: dict[str, np.ndarray] = {}
    start = 0
    for width, score in parts:
        out.update(score(totals[..., start : start + width]))
        start += width
    return out
