"""A task's runs read as a study: what the report leads with.

Runs are grouped by (model, method); a group's seeds are its repetitions. For each group: every metric's mean, with
a 95% interval (a t-interval over seeds, or with a single seed a bootstrap over the evaluation examples), the change
from the baseline, and the cost (trainable share, training time, peak memory, device-hours). The best group on the
task's main metric is marked, each other group is compared with it by a paired bootstrap on the same evaluation
examples (ftctl/stats.py), and the groups it cannot be told apart from are marked too. Flips count the
examples fine-tuning fixed and broke against the baseline, and those the best group gets right and another wrong.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ftctl import stats
from tasks._metrics import higher_is_better
from tasks.base import ExampleStatistics, RowView

if TYPE_CHECKING:  # annotations only: collect builds the runs and calls this module
    from launch.studies.collect import Run

EXAMPLES_SHOWN = 3  # flipped examples shown per direction


def pair_key(run: Run) -> tuple:
    """What the evaluated examples depend on: the task, the data, how many, and the seed when the evaluation split
    was carved from the training data with it. Two runs with the same key were scored on the same examples."""
    info = (run.scored or {}).get("info") or {}
    config = run.record.get("config") or {}
    held_out = not (config.get("validation_file") or config.get("test_file"))
    data = info.get("data") or (run.record.get("data") or {}).get("source")
    examples = info.get("examples") or (run.record.get("data") or {}).get("validation_examples")
    return (run.task, data, examples, config.get("seed") if held_out else None)


def evaluation(run: Run, rows: list[dict[str, Any]], task_cls: Any) -> stats.Evaluation | None:
    """The run's per-example statistics, when its task has them and its predictions file is of the task's shape."""
    if not rows or task_cls is None or not issubclass(task_cls, ExampleStatistics):
        return None
    state = (run.record.get("task") or {}).get("state") or {}
    try:  # the statistics hooks are classmethods: they read only their arguments
        values = task_cls.example_statistics(rows, state)
    except (KeyError, TypeError, ValueError):  # a predictions file from an older ftctl, without the fields needed
        return None
    # the rows actually scored are part of what is paired on (a predictions file may hold fewer than were evaluated)
    key = (*pair_key(run), len(rows))
    return stats.Evaluation(values, lambda totals: task_cls.metrics_from_totals(totals, state), key)


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _group_metrics(members: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    out = {}
    for metric in metrics:
        summary = stats.seed_summary([m["row"]["after"].get(metric) for m in members])
        if summary["n"] == 0:
            continue
        evaluated = members[0]["evaluation"]
        if summary["n"] == 1 and evaluated is not None and metric in evaluated.covers():
            interval = stats.bootstrap_interval(evaluated, metric)
            if interval:
                summary["ci"] = interval
                summary["ci_method"] = f"bootstrap over {len(evaluated.statistics)} examples"
        out[metric] = summary
    return out


def _flips(before: list[dict[str, Any]], after: list[dict[str, Any]], view: RowView) -> dict[str, Any] | None:
    """Examples right after but wrong before (fixed), and the reverse (broken), matched by index; the task's row
    view says which field tells a right prediction and what to show."""
    by_index = {r.get("index", i): r for i, r in enumerate(before)}
    fixed, broken, compared = [], [], 0
    for i, row in enumerate(after):
        other = by_index.get(row.get("index", i))
        now, then = view.is_correct(row), view.is_correct(other) if other else None
        if now is None or then is None:
            continue
        compared += 1
        if now and not then:
            fixed.append({**view.shown(row), "before": (other or {}).get("prediction")})
        elif then and not now:
            broken.append({**view.shown(row), "before": (other or {}).get("prediction")})
    if not compared:
        return None
    return {
        "examples": compared,
        "fixed": len(fixed),
        "broken": len(broken),
        "fixed_shown": fixed[:EXAMPLES_SHOWN],
        "broken_shown": broken[:EXAMPLES_SHOWN],
    }


def _paired(best: list[dict[str, Any]], other: list[dict[str, Any]]) -> tuple[list, list]:
    """The two groups' evaluations on the same examples, matched by what the examples depend on, then by seed."""
    a, b = [], []
    keys = {m["evaluation"].key for m in best if m["evaluation"]} & {
        m["evaluation"].key for m in other if m["evaluation"]
    }
    for key in sorted(keys, key=str):
        xs = sorted((m for m in best if m["evaluation"] and m["evaluation"].key == key), key=lambda m: str(m["seed"]))
        ys = sorted((m for m in other if m["evaluation"] and m["evaluation"].key == key), key=lambda m: str(m["seed"]))
        for x, y in zip(xs, ys, strict=False):
            a.append(x)
            b.append(y)
    return a, b


def analyse(task: dict[str, Any], members: list[dict[str, Any]], min_effect: float | None = None) -> dict[str, Any]:
    """The study view of one task: `members` are its runs as {row, run, evaluation, after_rows, before_rows}."""
    primary = task["metrics"][0] if task["metrics"] else None
    higher = higher_is_better(primary) if primary else True
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for member in members:
        grouped.setdefault((member["row"]["model"], member["row"]["method"]), []).append(member)
    groups = []
    for (model, method), runs in grouped.items():
        rows = [m["row"] for m in runs]
        metrics = _group_metrics(runs, task["metrics"])
        groups.append(
            {
                "model": model,
                "method": method,
                "runs": [r["run"] for r in rows],
                "seeds": [r["seed"] for r in rows],
                "metrics": metrics,
                "before": {m: _mean([(r["before"] or {}).get(m) for r in rows]) for m in task["metrics"]},
                "few_shot": _few_shot(rows, task["metrics"]),
                "delta": {m: _mean([r["delta"].get(m) for r in rows]) for m in task["metrics"]},
                "trainable_params": rows[0]["trainable_params"],
                "trainable_percent": rows[0]["trainable_percent"],
                "train_runtime_s": _mean([r["train_runtime_s"] for r in rows]),
                "peak_memory_mb": _mean([r["peak_memory_mb"] for r in rows]),
                "device_hours": sum(r.get("device_hours") or 0.0 for r in rows) or None,
                "searched": rows[0].get("searched"),
                "flips": [f for f in (_flips(m["before_rows"], m["after_rows"], m["view"]) for m in runs) if f] or None,
            }
        )
    out: dict[str, Any] = {"primary": primary, "higher_is_better": higher, "groups": groups, "comparisons": []}
    scored = [g for g in groups if primary in g["metrics"] and g["metrics"][primary]["mean"] is not None]
    if not primary or not scored:
        return out
    sign = 1 if higher else -1
    best = max(scored, key=lambda g: sign * g["metrics"][primary]["mean"])
    best["best"] = True
    best_runs = grouped[(best["model"], best["method"])]
    for target, runs in zip(groups, grouped.values(), strict=True):  # groups were built in grouped's order
        if target is best:
            continue
        a, b = _paired(best_runs, runs)
        comparison: dict[str, Any] = {"a": _label(best), "b": _label(target), "metric": primary}
        if not a:
            comparison.update(paired=False, reason="no per-example predictions on the same examples")
        else:
            difference = stats.paired_difference([m["evaluation"] for m in a], [m["evaluation"] for m in b], primary)
            comparison.update(paired=True, **difference)
            per_seed = [
                x["evaluation"].score(primary) - y["evaluation"].score(primary) for x, y in zip(a, b, strict=True)
            ]
            comparison["seeds_needed"] = stats.seeds_needed(per_seed, min_effect)
            per_run = [g["device_hours"] / len(g["runs"]) for g in (best, target) if g.get("device_hours")]
            if comparison["seeds_needed"].get("seeds") and len(per_run) == 2:
                comparison["seeds_needed"]["device_hours"] = comparison["seeds_needed"]["seeds"] * sum(per_run)
            # "fixed": the best group right where the other is wrong, on the first paired seed
            comparison["flips"] = _flips(b[0]["after_rows"], a[0]["after_rows"], a[0]["view"])
        out["comparisons"].append(comparison)
    adjust_for_many_comparisons(out["comparisons"], groups)
    return out


def adjust_for_many_comparisons(comparisons: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """Every method against the best is one family of comparisons: each gets its Holm-adjusted p-value (`holm`)
    beside the raw one, and its verdict from the adjusted one."""
    paired = [c for c in comparisons if c.get("paired")]
    by_label = {_label(g): g for g in groups}
    for comparison, adjusted in zip(paired, stats.holm([c["p_value"] for c in paired]), strict=True):
        comparison["holm"] = adjusted
        comparison["comparisons_in_family"] = len(paired)
        comparison["verdict"] = "difference" if adjusted < stats.ALPHA else "within noise"
        by_label[comparison["b"]]["indistinguishable"] = comparison["verdict"] == "within noise"


def _few_shot(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any] | None:
    """The K-shot baseline's metrics (the same for every seed of a group where the evaluation data is shared)."""
    found = [r["few_shot"] for r in rows if r.get("few_shot")]
    if not found:
        return None
    return {"k": found[0]["k"], **{m: _mean([f.get(m) for f in found]) for m in metrics}}


def _label(group: dict[str, Any]) -> str:
    return f"{group['model']} / {group['method']}"
