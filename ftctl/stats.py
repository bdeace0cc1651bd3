"""Study statistics: how sure a study can be of each number, and of each difference between methods.

- **Across seeds** (a cell run with several seeds): mean, sample standard deviation and the 95% t-interval of the
  mean (`scipy.stats.t`), the spread a reader should expect from the seed alone (Dodge et al. 2020).
- **One seed**: a percentile bootstrap over the evaluation examples (`scipy.stats.bootstrap`), from the run's
  per-example predictions.
- **Two methods on the same examples**: a paired, hierarchical bootstrap of the difference in a metric. Each
  resample draws seeds with replacement (pairing the two methods' runs of the same seed), then, for each drawn
  seed, evaluation examples with replacement (the same examples for both methods). Its percentile interval and
  two-sided p-value (twice the smaller share of resampled differences on either side of zero) describe the
  difference; an interval that contains zero is "within noise". With one seed it is the classic paired bootstrap
  over examples (Koehn 2004; sacreBLEU's paired bootstrap); tests/studies/test_stats.py checks it against
  `scipy.stats.bootstrap` and a paired `scipy.stats.permutation_test`.

- **Many comparisons** (every method against a task's best): Holm's step-down correction of their p-values
  (`statsmodels.stats.multitest.multipletests`, method "holm"), which holds the chance of any false "difference"
  in the family at 5%; the verdicts read the adjusted p-values.

- **Seeds needed**: from the spread of the per-seed differences of two methods (paired by seed), the seeds per
  method a paired t-test needs to resolve the observed difference (or a given smallest effect) at 80% power and
  the 5% level (`statsmodels.stats.power.TTestPower`; Card et al. 2020 on power in NLP).

Every metric is recomputed on each resample from additive per-example statistics (tasks/_statistics.py), so metrics
that are not averages (entity F1, macro F1, Pearson's r, corpus BLEU) are resampled exactly, not approximated by
averaging per-example scores.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # the family-wise error rate the verdicts hold (Holm-adjusted p-values below it differ)
RESAMPLES = 2000
BATCH = 250  # resamples scored at once: bounds memory at BATCH x examples x statistics
SEED = 0  # resampling is seeded: a report of the same runs gives the same intervals


MetricsFn = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclasses.dataclass
class Evaluation:
    """One run's evaluation, as resampling needs it: per-example additive statistics and the function that turns
    their sums into the task's metrics."""

    statistics: np.ndarray  # (examples, k)
    metrics: MetricsFn
    key: tuple  # what identifies the evaluated examples (two evaluations are paired only when their keys agree)

    def covers(self) -> set[str]:
        """The metrics the statistics give (a task may have others, e.g. Spearman's rho, that they do not)."""
        return set(self.metrics(self.statistics.sum(axis=0)))

    def score(self, metric: str, idx: np.ndarray | None = None) -> np.ndarray:
        """The metric on the examples `idx` ((..., n) indices; None: all examples), vectorized over leading dims."""
        rows = self.statistics if idx is None else self.statistics[idx]
        return np.asarray(self.metrics(rows.sum(axis=-2))[metric], dtype=float)


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    return a[np.isfinite(a)]


def seed_summary(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, sample standard deviation and the t-interval of the mean over seeds (none for a single seed)."""
    a = _finite(values)
    out: dict[str, Any] = {"n": int(a.size), "mean": float(a.mean()) if a.size else None, "std": None, "ci": None}
    if a.size >= 2:
        out["std"] = float(a.std(ddof=1))
        sem = scipy_stats.sem(a)
        if sem > 0:
            low, high = scipy_stats.t.interval(confidence, df=a.size - 1, loc=a.mean(), scale=sem)
            out["ci"] = [float(low), float(high)]
        else:
            out["ci"] = [float(a.mean()), float(a.mean())]
        out["ci_method"] = f"t-interval over {a.size} seeds"
    return out


def bootstrap_interval(
    evaluation: Evaluation, metric: str, confidence: float = CONFIDENCE, resamples: int = RESAMPLES
) -> list[float] | None:
    """Percentile bootstrap interval of one run's metric over its evaluation examples (`scipy.stats.bootstrap`)."""
    n = len(evaluation.statistics)
    if n < 2:
        return None

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return evaluation.score(metric, np.moveaxis(idx, axis, -1).astype(int))

    result = scipy_stats.bootstrap(
        (np.arange(n),),
        statistic,
        vectorized=True,
        n_resamples=resamples,
        batch=BATCH,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )
    low, high = result.confidence_interval
    return [float(low), float(high)] if math.isfinite(low) and math.isfinite(high) else None


def paired_difference(
    a: Sequence[Evaluation],
    b: Sequence[Evaluation],
    metric: str,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """The difference a - b in `metric`, averaged over paired seeds (a[i] and b[i] evaluated on the same examples),
    with its hierarchical bootstrap interval and two-sided p-value (see the module docstring)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_difference needs the same number (at least one) of evaluations on each side")
    for x, y in zip(a, b, strict=True):
        if x.key != y.key or len(x.statistics) != len(y.statistics):
            raise ValueError("paired evaluations must cover the same examples")
    rng = np.random.default_rng(seed)
    k = len(a)
    observed = float(np.mean([x.score(metric) - y.score(metric) for x, y in zip(a, b, strict=True)]))
    # draws[c][j]: resampled differences of seed j for the c-th seed drawn in each resample
    draws = np.empty((k, k, resamples))
    for c in range(k):
        for j, (x, y) in enumerate(zip(a, b, strict=True)):
            n = len(x.statistics)
            for start in range(0, resamples, BATCH):
                stop = min(start + BATCH, resamples)
                idx = rng.integers(0, n, size=(stop - start, n))
                draws[c, j, start:stop] = x.score(metric, idx) - y.score(metric, idx)
    picks = rng.integers(0, k, size=(resamples, k)) if k > 1 else np.zeros((resamples, 1), dtype=int)
    differences = np.mean([draws[c, picks[:, c], np.arange(resamples)] for c in range(k)], axis=0)
    differences = differences[np.isfinite(differences)]
    tail = (1 - confidence) / 2
    low, high = (float(q) for q in np.quantile(differences, [tail, 1 - tail]))
    below, above = (differences <= 0).mean(), (differences >= 0).mean()
    p = min(1.0, 2 * min(below, above) + 1 / (len(differences) + 1))
    return {
        "difference": observed,
        "ci": [low, high],
        "p_value": float(p),
        "within_noise": bool(low <= 0 <= high),
        "seeds": k,
        "examples": int(np.mean([len(x.statistics) for x in a])),
        "resamples": int(len(differences)),
        "method": "paired hierarchical bootstrap (seeds, then examples)" if k > 1 else "paired bootstrap (examples)",
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values of one family of comparisons, in the order given."""
    if not p_values:
        return []
    return [float(p) for p in multipletests(list(p_values), method="holm")[1]]


MOST_SEEDS = 1000  # beyond this, "more than 1000": the difference is too small against the seed noise to chase


def seeds_needed(differences: Sequence[float], effect: float | None = None, power: float = 0.8) -> dict[str, Any]:
    """How many seeds per method resolve a difference at `power`: that of the paired per-seed `differences` (or
    `effect`, the smallest difference worth finding), against their standard deviation. Needs two seeds or more."""
    values = np.asarray(differences, dtype=float)
    values = values[np.isfinite(values)]
    target = abs(float(np.mean(values))) if effect is None else abs(effect)
    if len(values) < 2:
        return {"seeds": None, "why": "one seed: no seed variance to plan from"}
    spread = float(np.std(values, ddof=1))
    base = {"effect": target, "seed_std": spread, "power": power, "alpha": ALPHA}
    if spread == 0 or target == 0:
        why = "the seeds do not vary" if spread == 0 else "no difference to resolve"
        return {**base, "seeds": None if target == 0 else 2, "why": why}
    counts = np.arange(
        2, MOST_SEEDS + 1
    )  # the smallest count that reaches `power` (solve_power fails on large effects)
    reached = TTestPower().power(target / spread, nobs=counts, alpha=ALPHA, alternative="two-sided") >= power
    seeds = int(counts[np.argmax(reached)]) if reached.any() else None
    return {**base, "seeds": seeds, "why": None if seeds else f"more than {MOST_SEEDS} seeds"}


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points (cost, metric) no other point beats on both: lower or equal cost and a better or equal
    metric, better on one. Ordered by cost."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for i, (cost, value) in enumerate(points):
        if not (math.isfinite(cost) and math.isfinite(value)):
            continue
        dominated = any(
            c <= cost and sign * v >= sign * value and (c < cost or sign * v > sign * value)
            for j, (c, v) in enumerate(points)
            if j != i and math.isfinite(c) and math.isfinite(v)
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])
