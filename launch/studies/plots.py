"""The report's figures, drawn from the assembled report data (launch/studies/collect.py)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ftctl import stats
from launch.studies.collect import _is_number


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "task"


def _name(task: dict[str, Any], row: dict[str, Any]) -> str:
    parts = [row["model"]] if task["models"] else []
    parts.append(row["method"])
    if task["seeds"]:
        parts.append(f"seed {row['seed']}")
    return " / ".join(str(p) for p in parts)


def _figure(cols: int, rows: int, width: float = 4.2, height: float = 3.0) -> Any:
    fig = Figure(figsize=(width * cols, height * rows), dpi=80, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> str:
    fig.savefig(path, format="png")
    return path.name


def plot_task(task: dict[str, Any], out: Path) -> dict[str, str]:
    """The task's figures, written into `out`; returns {kind: file name}."""
    slug, rows = _slug(task["task"]), task["rows"]
    names = [_name(task, r) for r in rows]
    files: dict[str, str] = {}
    for draw in (_pareto, _metrics, _search, _losses, _matrices, _bars, _scores):
        files.update(draw(task, rows, names, out, slug))
    return files


def _losses(task: dict[str, Any], rows: list[dict], names: list[str], out: Path, slug: str) -> dict[str, str]:
    files: dict[str, str] = {}
    if any(r["history"]["train"] or r["history"]["eval"] for r in rows):
        panels = [k for k in ("train", "eval") if any(r["history"][k] for r in rows)]
        fig, axes = _figure(len(panels), 1)
        for ax, kind in zip(axes[0], panels, strict=True):
            for name, row in zip(names, rows, strict=True):
                points = row["history"][kind]
                if points:
                    ax.plot(
                        *zip(*points, strict=True), marker="o" if kind == "eval" else None, markersize=3, label=name
                    )
            ax.set(title=f"{kind} loss", xlabel="step", ylabel="loss")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{task['task']}: loss curves")
        files["loss"] = _save(fig, out / f"{slug}_loss.png")
    return files


def group_name(task: dict[str, Any], group: dict[str, Any]) -> str:
    return f"{group['model']} / {group['method']}" if task["models"] else str(group["method"])


def _error(summary: dict[str, Any] | None) -> tuple[float, float]:
    """(below, above) the mean to the interval's ends; none without an interval."""
    if not summary or not summary.get("ci") or summary.get("mean") is None:
        return 0.0, 0.0
    low, high = summary["ci"]
    return max(0.0, summary["mean"] - low), max(0.0, high - summary["mean"])


def _metrics(task: dict[str, Any], rows: list[dict], names: list[str], out: Path, slug: str) -> dict[str, str]:
    """Before and after per (model, method), the after bar with its 95% interval, one panel per metric."""
    groups = task.get("groups") or []
    metrics = [m for m in task["metrics"] if any(m in g["metrics"] for g in groups)]
    if not metrics:
        return {}
    labels = [group_name(task, g) for g in groups]
    cols = min(3, len(metrics))
    fig, axes = _figure(cols, math.ceil(len(metrics) / cols), width=max(3.2, 0.9 * len(groups) + 1.6))
    for i, metric in enumerate(metrics):
        ax = axes[i // cols][i % cols]
        xs = range(len(groups))
        before = [g["before"].get(metric) if _is_number(g["before"].get(metric)) else math.nan for g in groups]
        after = [(g["metrics"].get(metric) or {}).get("mean", math.nan) for g in groups]
        errors = [_error(g["metrics"].get(metric)) for g in groups]
        yerr = [[e[0] for e in errors], [e[1] for e in errors]]
        if any(_is_number(v) for v in before):
            ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before", color="#bbbbbb")
            ax.bar([x + 0.2 for x in xs], after, width=0.4, yerr=yerr, capsize=3, label="after", color="#1f77b4")
        else:
            ax.bar(list(xs), after, width=0.6, yerr=yerr, capsize=3, label="after", color="#1f77b4")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    for j in range(len(metrics), axes.size):
        axes[j // cols][j % cols].set_visible(False)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=7)
    fig.suptitle(f"{task['task']}: before and after fine-tuning")
    return {"metrics": _save(fig, out / f"{slug}_metrics.png")}


COSTS = (("trainable parameters", "trainable_params", True), ("training time (s)", "train_runtime_s", False),
         ("peak memory (MB)", "peak_memory_mb", False))  # fmt: skip


def _pareto(task: dict[str, Any], rows: list[dict], names: list[str], out: Path, slug: str) -> dict[str, str]:
    """The main metric against each cost, with the front of results nothing beats on both."""
    primary = task.get("primary")
    groups = [g for g in task.get("groups") or [] if _is_number((g["metrics"].get(primary) or {}).get("mean"))]
    panels = [c for c in COSTS if sum(_is_number(g.get(c[1])) for g in groups) >= 2]
    if len(groups) < 2 or not panels:
        return {}
    fig, axes = _figure(len(panels), 1, width=4.4, height=3.4)
    for ax, (label, key, log) in zip(axes[0], panels, strict=True):
        shown = [g for g in groups if _is_number(g.get(key))]
        xs = [float(g[key]) for g in shown]
        ys = [g["metrics"][primary]["mean"] for g in shown]
        errors = [_error(g["metrics"][primary]) for g in shown]
        ax.errorbar(xs, ys, yerr=[[e[0] for e in errors], [e[1] for e in errors]], fmt="o", capsize=3, color="#1f77b4")
        for x, y, g in zip(xs, ys, shown, strict=True):
            ax.annotate(group_name(task, g), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = stats.pareto_front(list(zip(xs, ys, strict=True)), task.get("higher_is_better", True))
        if len(front) > 1:
            ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="#d62728", linewidth=1)
        if log and min(xs) > 0:
            ax.set_xscale("log")
        ax.set(xlabel=label, ylabel=primary)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{task['task']}: {primary} against cost (front in red)")
    return {"pareto": _save(fig, out / f"{slug}_pareto.png")}


def _search(task: dict[str, Any], rows: list[dict], names: list[str], out: Path, slug: str) -> dict[str, str]:
    """Each search's trials: the score against the searched value (the learning rate where it was searched)."""
    searches = task.get("searches") or []
    if not searches:
        return {}
    fig, axes = _figure(1, 1, width=5.0, height=3.6)
    ax = axes[0][0]
    option = next((o for s in searches for o in s["space"] if o == "learning_rate"), next(iter(searches[0]["space"])))
    for search in searches:
        trials = sorted((t for t in search["trials"] if option in t["params"] and _is_number(t.get("value"))),
                        key=lambda t: t["params"][option])  # fmt: skip
        if not trials:
            continue
        name = f"{search['model']} / {search['method']}" if task["models"] else search["method"]
        xs, ys = [t["params"][option] for t in trials], [t["value"] for t in trials]
        (line,) = ax.plot(xs, ys, label=name, linewidth=1)
        for x, y, t in zip(xs, ys, trials, strict=True):
            ax.plot(x, y, "x" if t["state"] == "pruned" else "o", color=line.get_color(), markersize=6)
        best = (search.get("best") or {}).get("params", {}).get(option)
        if best is not None:
            ax.plot(best, search["best"]["value"], "*", color=line.get_color(), markersize=12)
    if option == "learning_rate":
        ax.set_xscale("log")
    ax.set(xlabel=option, ylabel=f"{searches[0]['metric']} (split of the training data)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{task['task']}: search (o complete, x pruned, * chosen)")
    return {"search": _save(fig, out / f"{slug}_search.png")}


def _views(rows: list[dict], names: list[str], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """(run name, detail view) for every run's details of this kind (see tasks.base.DetailView)."""
    return [(n, v) for n, r in zip(names, rows, strict=True) for v in r.get("details", []) if v["kind"] == kind]


def _matrices(task: dict[str, Any], rows: list[dict], names: list[str], out: Path, slug: str) -> dict[str, str]:
    """Label x label counts (a confusion matrix), one panel per run."""
    views = _views(rows, names, "matrix")
    if not views:
        return {}
    cols = min(3, len(views))
    fig, axes = _figure(cols, math.ceil(len(views) / cols), width=3.6, height=3.4)
    for i, (name, view) in enumerate(views):
        ax = axes[i // cols][i % cols]
        matrix, labels = view["values"], [str(x) for x in view["labels"]]
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set(title=name, xlabel="predicted", ylabel="true")
        if len(labels) <= 10:
            peak = max(max(line) for line in matrix) or 1
            for y, line in enumerate(matrix):
                for x, count in enumerate(line):
                    color = "white" if count > peak / 2 else "black"
                    ax.text(x, y, str(count), ha="center", va="center", fontsize=7, color=color)
    for j in range(len(views), axes.size):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle(f"{task['task']}: {views[0][1]['title']}")
    return {"matrix": _save(fig, out / f"{slug}_matrix.png")}


def _bars(task: dict[str, Any], rows: list[dict], names: list[str], out: Path, slug: str) -> dict[str, str]:
    """A value per named item (F1 per entity type), one bar group per item, a bar per run."""
    views = _views(rows, names, "bars")
    if not views:
        return {}
    items = sorted({label for _, view in views for label in view["labels"]})
    fig, axes = _figure(1, 1, width=max(4.5, 0.5 * len(items) * len(views) + 2))
    ax, width = axes[0][0], 0.8 / len(views)
    for i, (name, view) in enumerate(views):
        values = dict(zip(view["labels"], view["values"], strict=True))
        xs = [k + i * width - 0.4 + width / 2 for k in range(len(items))]
        ax.bar(xs, [values.get(item, math.nan) for item in items], width=width, label=name)
    ax.set_xticks(range(len(items)), items)
    ax.set(ylabel=views[0][1]["value_name"], ylim=(0, 1), title=f"{task['task']}: {views[0][1]['title']}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return {"bars": _save(fig, out / f"{slug}_bars.png")}


def _scores(task: dict[str, Any], rows: list[dict], names: list[str], out: Path, slug: str) -> dict[str, str]:
    """Per-example score distributions, and per example before vs after."""
    files: dict[str, str] = {}
    scored = [(n, r["per_example"]) for n, r in zip(names, rows, strict=True) if r.get("per_example")]
    if scored:
        score_metrics = list(dict.fromkeys(m for _, per in scored for m in per))
        fig, axes = _figure(2, len(score_metrics))
        for i, metric in enumerate(score_metrics):
            series, labels = [], []
            baseline = next(
                (per[metric]["values_before"] for _, per in scored if metric in per and "values_before" in per[metric]),
                None,
            )
            if baseline:
                series.append(list(baseline.values()))
                labels.append("zero-shot")
            for name, per in scored:
                if metric in per:
                    series.append(list(per[metric]["values_after"].values()))
                    labels.append(name)
            hist, box = axes[i]
            low, high = min(min(v) for v in series), max(max(v) for v in series)
            bins = [low + (high - low) * k / 20 for k in range(21)] if high > low else 10
            for values, label in zip(series, labels, strict=True):
                hist.hist(
                    values, bins=bins, label=label, histtype="stepfilled", alpha=0.35, edgecolor="black", linewidth=0.6
                )
            hist.set(title=f"{metric} per example", xlabel=metric, ylabel="examples")
            hist.legend(fontsize=7)
            box.boxplot(series, tick_labels=labels)
            box.tick_params(axis="x", labelrotation=30, labelsize=7)
            box.set(title=f"{metric} per example", ylabel=metric)
        fig.suptitle(f"{task['task']}: per-example score distributions")
        files["scores"] = _save(fig, out / f"{slug}_scores.png")
        pairs = []
        for name, per in scored:
            metric = next((m for m in per if "values_before" in per[m]), None)
            if metric:
                before, after = per[metric]["values_before"], per[metric]["values_after"]
                common = [k for k in after if k in before]
                pairs.append((name, metric, [before[k] for k in common], [after[k] for k in common]))
        if pairs:
            cols = min(3, len(pairs))
            fig, axes = _figure(cols, math.ceil(len(pairs) / cols), width=3.4, height=3.4)
            for i, (name, metric, xs, ys) in enumerate(pairs):
                ax = axes[i // cols][i % cols]
                ax.scatter(xs, ys, s=8, alpha=0.6)
                low, high = min(xs + ys + [0.0]), max(xs + ys + [1e-9])
                ax.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1, label="y = x")
                ax.set(title=name, xlabel=f"{metric} before (zero-shot)", ylabel=f"{metric} after")
                ax.legend(fontsize=7)
            for j in range(len(pairs), axes.size):
                axes[j // cols][j % cols].set_visible(False)
            fig.suptitle(f"{task['task']}: per example, before vs after")
            files["scatter"] = _save(fig, out / f"{slug}_scatter.png")
    return files
