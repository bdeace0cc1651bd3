"""Comparison reports: `ftctl report DIR...` and `python -m launch.report DIR...` run `main`.

Reads finished run directories (a grid directory, a folder of runs, or run directories named one by one) and writes
`report.md` (and `report.html` with `--format html`), `report.json` with the same numbers for machines, and PNG
plots. Every number is taken as is from the runs' `run.json` (training cost, history) and `eval.json` (the metric
after fine-tuning and the zero-shot baseline before it); the report formats them and computes only the deltas and
the summaries of per-example scores.

The zero-shot baseline of a run is its own `eval.json` baseline (`ftctl evaluate --baseline`), else the one its
grid scored for the same model and task, else that of another run in the report with the same base model, task and
evaluation data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from launch.errors import FtctlError

REPORT_FILES = ("report.md", "report.json", "report.html")
MAX_SCORE_METRICS = 3  # per-example metrics drawn per task (the task's own order: its main metric first)


@dataclasses.dataclass
class Run:
    label: str
    path: Path
    record: dict[str, Any]  # run.json
    scored: dict[str, Any] | None  # eval.json
    model: str
    task: str
    method: str
    seed: Any
    baseline_dir: Path | None = None  # the run directory whose eval.json holds this run's baseline
    baseline: dict[str, Any] | None = None


# ---- reading ---------------------------------------------------------------------------------------------------
def _read(path: Path, what: str) -> dict[str, Any]:
    from launch import rundir

    return rundir.read_json(path, what)


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return []  # a damaged predictions file: no per-example plots for it, the tables still hold
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _short_model(record: dict[str, Any]) -> str:
    model = record.get("model") or {}
    name = model.get("hub_id") or model.get("display") or model.get("name_or_path") or "model"
    return Path(str(name).rstrip("/")).name


def _run(path: Path, label: str, cell: dict[str, Any] | None = None) -> Run:
    record = _read(path / "run.json", "run record")
    if record.get("status") != "completed":
        raise FtctlError(f"{path / 'run.json'} is not a completed ftctl run record")
    scored = _read(path / "eval.json", "evaluation") if (path / "eval.json").is_file() else None
    config = record.get("config") or {}
    task = (record.get("task") or {}).get("preset") or config.get("task") or "task"
    run = Run(
        label=label,
        path=path,
        record=record,
        scored=scored,
        model=cell["model"] if cell else _short_model(record),
        task=cell["task"] if cell else task,
        method=cell["method"] if cell else (record.get("method") or {}).get("name") or config.get("method", "?"),
        seed=cell["seed"] if cell else config.get("seed"),
    )
    if scored and "baseline" in scored:
        run.baseline_dir, run.baseline = path, scored["baseline"]
    return run


def collect(paths: list[str]) -> tuple[list[Run], list[dict[str, Any]], list[str]]:
    """(finished runs, grid cells without results, grid names) from grid directories, folders of runs and runs."""
    runs: list[Run] = []
    missing: list[dict[str, Any]] = []
    grids: list[str] = []

    def add_grid(grid: Path) -> None:
        state = _read(grid / "grid.json", "grid state")
        grids.append(str(state.get("name") or grid.name))
        for cell in state.get("cells", []):
            path = grid / cell["run_dir"]
            if (path / "run.json").is_file():
                run = _run(path, cell["id"], cell)
                source = cell.get("baseline_cell")
                if run.baseline is None and source and (grid / source / "eval.json").is_file():
                    base = _read(grid / source / "eval.json", "evaluation").get("baseline")
                    if base is not None:
                        run.baseline_dir, run.baseline = grid / source, base
                runs.append(run)
            else:
                missing.append({"cell": cell["id"], "status": cell.get("status"), "reason": cell.get("error")})

    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise FtctlError(f"not a directory: {given}")
        if (path / "grid.json").is_file():
            add_grid(path)
        elif (path / "run.json").is_file():
            runs.append(_run(path, path.name))
        elif (path / "spec.json").is_file():
            raise FtctlError(f"the run in {given} did not finish (no run.json); finish it with --resume first")
        else:
            children = sorted(p for p in path.iterdir() if p.is_dir())
            found = False
            for child in children:
                if (child / "grid.json").is_file():
                    add_grid(child)
                    found = True
                elif (child / "run.json").is_file():
                    runs.append(_run(child, child.name))
                    found = True
            if not found:
                raise FtctlError(f"{given} holds no grid (grid.json) or finished run (run.json), nor folders that do")
    if not runs:
        raise FtctlError(
            "no finished run to report on" + (f" ({len(missing)} grid cells not finished)" if missing else "")
        )
    seen: dict[str, int] = {}
    for run in runs:  # the same label from two sources: tell them apart by their folder
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.path.parent.name})"
    _share_baselines(runs)
    return runs, missing, grids


def _eval_key(run: Run) -> tuple | None:
    """What makes two evaluations comparable: task, base model, data (a held-out split depends on the seed)."""
    if not run.scored:
        return None
    info, config = run.scored.get("info") or {}, run.record.get("config") or {}
    held_out = not (config.get("validation_file") or config.get("test_file"))
    return (
        run.task,
        info.get("base_model"),
        info.get("data"),
        info.get("examples"),
        config.get("seed") if held_out else None,
    )


def _share_baselines(runs: list[Run]) -> None:
    """Runs without a baseline borrow one scored on the same base model, task and evaluation data."""
    known = {}
    for run in runs:
        if run.baseline is not None and _eval_key(run):
            known.setdefault(_eval_key(run), run)
    for run in runs:
        if run.baseline is None and _eval_key(run) in known:
            source = known[_eval_key(run)]
            run.baseline_dir, run.baseline = source.baseline_dir, source.baseline


# ---- numbers -----------------------------------------------------------------------------------------------------
def _scalars(metrics: dict[str, Any] | None) -> dict[str, float]:
    from launch.console import scalar_metrics

    if not metrics:
        return {}
    return scalar_metrics({k: v for k, v in metrics.items() if k not in ("details", "baseline", "info")})


def _task_class(record: dict[str, Any]) -> Any:
    from tasks import TASKS

    preset = (record.get("task") or {}).get("preset")
    return TASKS.get(preset).cls if preset in TASKS else None


def _metric_order(runs: list[Run], after: dict[str, dict[str, float]]) -> list[str]:
    """The task's metrics, its main one first, then whatever else the runs report (e.g. the loss)."""
    cls = _task_class(runs[0].record)
    declared = [cls.primary_metric, *(m for m in cls.metrics if m != cls.primary_metric)] if cls else []
    seen = [k for r in runs for k in after[r.label]]
    return [m for m in declared if m in seen] + list(dict.fromkeys(k for k in seen if k not in declared))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def example_scores(rows: list[dict[str, Any]], metrics: list[str], record: dict[str, Any]) -> dict[str, dict]:
    """Per-example scores: metric -> {example index: value}.

    Read from the predictions' own fields: one named after each of the task's metrics (`f1`, `exact_match`,
    `rougeL`, `perplexity`, ...), else a generic `score`. Generated text without such fields (`prediction` and
    `reference`) is scored here, one example at a time, with the task's own scoring function, so the values are
    the task's metric on each example (sentence-level where the task's metric is corpus-level, as BLEU is).
    """
    if not rows:
        return {}
    fields = [m for m in metrics if any(_is_number(r.get(m)) for r in rows)]
    if not fields and any(_is_number(r.get("score")) for r in rows):
        fields = ["score"]
    if fields:
        return {f: {r.get("index", i): r[f] for i, r in enumerate(rows) if _is_number(r.get(f))} for f in fields}
    if not all(isinstance(r.get("prediction"), str) and isinstance(r.get("reference"), str) for r in rows):
        return {}
    score = _text_scorer(record)
    if score is None:
        return {}
    out: dict[str, dict] = {}
    for i, row in enumerate(rows):
        for name, value in score([row["prediction"]], [list(row.get("references") or [row["reference"]])]).items():
            if _is_number(value) and (name in metrics or not metrics):
                out.setdefault(name, {})[row.get("index", i)] = float(value)
    return out


def _text_scorer(record: dict[str, Any]) -> Any:
    """The run's task's text scoring function (generation tasks have one), or None."""
    from launch.config import resolve_values

    try:
        task = resolve_values(dict(record.get("config") or {})).task
    except FtctlError:
        return None
    return getattr(task, "score_texts", None)


def _stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _details(run: Run) -> dict[str, Any]:
    """The non-scalar analysis of the same evaluation the metrics come from."""
    if run.scored:
        return run.scored.get("details") or {}
    return run.record.get("metric_details") or {}


def _size(record: dict[str, Any]) -> dict[str, Any]:
    saved = record.get("saved_weights") or (record.get("method") or {}).get("saved_weights") or {}
    return {"size_mb": saved.get("mb"), "size_bytes": saved.get("bytes")}


def assemble(runs: list[Run], missing: list[dict[str, Any]], title: str) -> dict[str, Any]:
    """Everything the report shows, as data: what report.json holds and the markdown and plots are drawn from."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.task, []).append(run)
    tasks = []
    for name, members in groups.items():
        after = {r.label: _scalars(r.scored) if r.scored else _scalars(r.record.get("metrics")) for r in members}
        metrics = _metric_order(members, after)
        rows, scores = [], []
        for run in members:
            rec = run.record
            before = _scalars(run.baseline) if run.baseline is not None else None
            row: dict[str, Any] = {
                "run": run.label,
                "run_dir": str(run.path.resolve()),
                "model": run.model,
                "method": run.method,
                "seed": run.seed,
                "trainable_params": rec.get("trainable_params"),
                "total_params": rec.get("total_params"),
                "trainable_percent": rec.get("trainable_percent"),
                "reduction_percent": rec.get("reduction_percent"),
                **_size(rec),
                "train_runtime_s": rec.get("train_runtime_s"),
                "samples_per_second": rec.get("samples_per_second"),
                "tokens_per_second": rec.get("tokens_per_second"),
                "peak_memory_mb": rec.get("peak_memory_mb"),
                "after": after[run.label],
                "after_source": "eval.json" if run.scored else "run.json metrics (validation)",
                "before": before,
                "baseline_from": str(run.baseline_dir.resolve()) if run.baseline_dir else None,
                "delta": {
                    m: after[run.label][m] - before[m]
                    for m in metrics
                    if before and m in before and m in after[run.label]
                },
                "evaluated_on": (run.scored or {}).get("info", {}).get("data") or (rec.get("data") or {}).get("source"),
                "examples": (run.scored or {}).get("info", {}).get("examples"),
                "history": {
                    "train": [(h["step"], h["loss"]) for h in rec.get("history", []) if "loss" in h and "step" in h],
                    "eval": [
                        (h["step"], h["eval_loss"]) for h in rec.get("history", []) if "eval_loss" in h and "step" in h
                    ],
                },
            }
            details = _details(run)
            if isinstance(details.get("confusion_matrix"), dict):
                row["confusion_matrix"] = details["confusion_matrix"]
            if isinstance(details.get("per_entity"), dict):
                row["per_entity"] = details["per_entity"]
            after_rows = _rows(run.path / ("eval_predictions.jsonl" if run.scored else "predictions.jsonl"))
            before_rows = _rows(run.baseline_dir / "eval_baseline_predictions.jsonl") if run.baseline_dir else []
            scores.append((example_scores(after_rows, metrics, rec), example_scores(before_rows, metrics, rec)))
            rows.append(row)
        # per-example scores: the task's metrics in its order, at most MAX_SCORE_METRICS of them
        found = [m for m in [*metrics, "score"] if any(m in after for after, _ in scores)][:MAX_SCORE_METRICS]
        for row, (after, before) in zip(rows, scores, strict=True):
            per_example = {}
            for metric in (m for m in found if after.get(m)):
                entry: dict[str, Any] = {"after": _stats(list(after[metric].values())), "values_after": after[metric]}
                if before.get(metric):
                    entry["before"] = _stats(list(before[metric].values()))
                    entry["values_before"] = before[metric]
                per_example[metric] = entry
            if per_example:
                row["per_example"] = per_example
        first = members[0]
        tasks.append(
            {
                "task": name,
                "preset": (first.record.get("task") or {}).get("preset"),
                "kind": (first.record.get("task") or {}).get("kind"),
                "metrics": metrics,
                "evaluated_on": sorted({str(r["evaluated_on"]) for r in rows}),
                "seeds": len({str(r["seed"]) for r in rows}) > 1,
                "models": len({r["model"] for r in rows}) > 1,
                "rows": rows,
            }
        )
    return {
        "title": title,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": len(runs),
        "tasks": tasks,
        "not_reported": missing,
    }


# ---- plots -------------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "task"


def _name(task: dict[str, Any], row: dict[str, Any]) -> str:
    parts = [row["model"]] if task["models"] else []
    parts.append(row["method"])
    if task["seeds"]:
        parts.append(f"seed {row['seed']}")
    return " / ".join(str(p) for p in parts)


def _figure(cols: int, rows: int, width: float = 4.2, height: float = 3.0) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), dpi=80, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> str:
    fig.savefig(path, format="png")
    return path.name


def plot_task(task: dict[str, Any], out: Path) -> dict[str, str]:
    """The task's figures, written into `out`; returns {kind: file name}."""
    slug, rows, files = _slug(task["task"]), task["rows"], {}
    names = [_name(task, r) for r in rows]

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

    metrics = task["metrics"]
    if metrics:
        cols = min(3, len(metrics))
        fig, axes = _figure(cols, math.ceil(len(metrics) / cols), width=max(3.2, 0.9 * len(rows) + 1.6))
        for i, metric in enumerate(metrics):
            ax = axes[i // cols][i % cols]
            xs = range(len(rows))
            before = [(r["before"] or {}).get(metric, math.nan) for r in rows]
            after = [r["after"].get(metric, math.nan) for r in rows]
            if any(_is_number(v) for v in before):
                ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before (zero-shot)", color="#bbbbbb")
                ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after", color="#1f77b4")
            else:
                ax.bar(list(xs), after, width=0.6, label="after", color="#1f77b4")
            ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=7)
            ax.set_title(metric)
            ax.grid(axis="y", alpha=0.3)
        for j in range(len(metrics), axes.size):
            axes[j // cols][j % cols].set_visible(False)
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=7)
        fig.suptitle(f"{task['task']}: before and after fine-tuning")
        files["metrics"] = _save(fig, out / f"{slug}_metrics.png")

    confusion = [(n, r["confusion_matrix"]) for n, r in zip(names, rows, strict=True) if "confusion_matrix" in r]
    if confusion:
        cols = min(3, len(confusion))
        fig, axes = _figure(cols, math.ceil(len(confusion) / cols), width=3.6, height=3.4)
        for i, (name, cm) in enumerate(confusion):
            ax = axes[i // cols][i % cols]
            matrix, labels = cm["matrix"], [str(x) for x in cm["labels"]]
            ax.imshow(matrix, cmap="Blues")
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set(title=name, xlabel="predicted", ylabel="true")
            if len(labels) <= 10:
                peak = max(max(line) for line in matrix) or 1
                for y, line in enumerate(matrix):
                    for x, count in enumerate(line):
                        ax.text(
                            x,
                            y,
                            str(count),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if count > peak / 2 else "black",
                        )
        for j in range(len(confusion), axes.size):
            axes[j // cols][j % cols].set_visible(False)
        fig.suptitle(f"{task['task']}: confusion matrices")
        files["confusion"] = _save(fig, out / f"{slug}_confusion.png")

    entities = [(n, r["per_entity"]) for n, r in zip(names, rows, strict=True) if r.get("per_entity")]
    if entities:
        kinds = sorted({e for _, per in entities for e in per})
        fig, axes = _figure(1, 1, width=max(4.5, 0.5 * len(kinds) * len(entities) + 2))
        ax, width = axes[0][0], 0.8 / len(entities)
        for i, (name, per) in enumerate(entities):
            ax.bar(
                [k + i * width - 0.4 + width / 2 for k in range(len(kinds))],
                [per.get(e, {}).get("f1", math.nan) for e in kinds],
                width=width,
                label=name,
            )
        ax.set_xticks(range(len(kinds)), kinds)
        ax.set(ylabel="F1", ylim=(0, 1), title=f"{task['task']}: F1 per entity type")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        files["entities"] = _save(fig, out / f"{slug}_entities.png")

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


# ---- text --------------------------------------------------------------------------------------------------------
def _fmt(value: Any, kind: str) -> str:
    if not _is_number(value):
        return "-"
    return {
        "int": f"{value:,.0f}",
        "pct": f"{value:.2f}",
        "mb": f"{value:.2f}",
        "s": f"{value:.1f}",
        "rate": f"{value:.1f}",
        "mem": f"{value:,.0f}",
        "metric": f"{value:.4f}",
        "delta": f"{value:+.4f}",
    }[kind]


COLUMNS = (  # (header, row key, format)
    ("trainable params", "trainable_params", "int"),
    ("reduction %", "reduction_percent", "pct"),
    ("size (MB)", "size_mb", "mb"),
    ("train time (s)", "train_runtime_s", "s"),
    ("samples/s", "samples_per_second", "rate"),
    ("peak memory (MB)", "peak_memory_mb", "mem"),
)


def table(task: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The task's comparison table: headers and formatted cells (markdown and HTML share it)."""
    headers = ["model", "method"] + (["seed"] if task["seeds"] else []) + [c[0] for c in COLUMNS]
    for metric in task["metrics"]:
        headers += [f"{metric} before", f"{metric} after", f"{metric} Δ"]
    body = []
    for row in task["rows"]:
        cells = [str(row["model"]), str(row["method"])] + ([str(row["seed"])] if task["seeds"] else [])
        cells += [_fmt(row.get(key), kind) for _, key, kind in COLUMNS]
        for metric in task["metrics"]:
            cells += [
                _fmt((row["before"] or {}).get(metric), "metric"),
                _fmt(row["after"].get(metric), "metric"),
                _fmt(row["delta"].get(metric), "delta"),
            ]
        body.append(cells)
    return headers, body


def _entity_table(task: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    rows = [r for r in task["rows"] if r.get("per_entity")]
    if not rows:
        return None
    kinds = sorted({e for r in rows for e in r["per_entity"]})
    headers = ["entity"] + [_name(task, r) for r in rows]
    body = [[kind] + [_fmt(r["per_entity"].get(kind, {}).get("f1"), "metric") for r in rows] for kind in kinds]
    return headers, body


def _score_table(task: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    rows = [r for r in task["rows"] if r.get("per_example")]
    if not rows:
        return None
    headers = ["run", "metric", "examples", "before mean", "after mean", "after median", "after std"]
    body = []
    for row in rows:
        for metric, entry in row["per_example"].items():
            body.append(
                [
                    _name(task, row),
                    metric,
                    str(entry["after"]["n"]),
                    _fmt(entry.get("before", {}).get("mean"), "metric"),
                    _fmt(entry["after"]["mean"], "metric"),
                    _fmt(entry["after"]["median"], "metric"),
                    _fmt(entry["after"]["std"], "metric"),
                ]
            )
    return headers, body


def _md_table(headers: list[str], body: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, body)])


EXPLAIN = (
    "**after**: the fine-tuned run scored by `ftctl evaluate` (its `eval.json`; the run's own validation metrics "
    "from `run.json` where it was not evaluated), on the data named per task. **before**: the same base model with "
    "an untrained task head, on the same data (the zero-shot baseline, `ftctl evaluate --baseline`). **Δ** = after "
    "- before. Trainable params, reduction % (the share of parameters left frozen), size of the saved weights (the "
    "adapter for PEFT methods), training time, training samples/s and peak memory (CUDA allocated on a GPU, process "
    "RSS on CPU) come from each run's `run.json`."
)


def _sections(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report as a sequence of (kind, content): heading, text, table, image."""
    out: list[tuple[str, Any]] = [
        ("h1", report["title"]),
        (
            "text",
            (
                f"{report['runs']} runs over {len(report['tasks'])} task(s); written {report['generated']} by `ftctl "
                "report`. The same numbers, unrounded: `report.json`."
            ),
        ),
        ("text", EXPLAIN),
    ]
    for task in report["tasks"]:
        out.append(("h2", f"{task['task']} ({task['kind']})"))
        out.append(("text", "Evaluated on: " + "; ".join(f"`{d}`" for d in task["evaluated_on"])))
        out.append(("table", table(task)))
        shared = {r["baseline_from"] for r in task["rows"] if r["baseline_from"]}
        if shared and len(shared) < len(task["rows"]):
            out.append(
                (
                    "text",
                    "The zero-shot baseline is scored once per base model and evaluation data, and "
                    "shared by the runs that fine-tune it.",
                )
            )
        plots = task.get("plots", {})
        for kind, caption in (
            ("loss", "loss curves"),
            ("metrics", "before and after, per metric"),
            ("confusion", "confusion matrices"),
            ("entities", "F1 per entity type"),
            ("scores", "per-example score distributions"),
            ("scatter", "per example, before vs after (y = x: no change)"),
        ):
            if kind in plots:
                out.append(("image", (caption, plots[kind])))
            if kind == "entities" and _entity_table(task):
                out.append(("h3", "F1 per entity type"))
                out.append(("table", _entity_table(task)))
            if kind == "scores" and _score_table(task):
                out.append(("h3", "Per-example scores"))
                out.append(("table", _score_table(task)))
    if report["not_reported"]:
        out.append(("h2", "Cells without results"))
        out.append(
            (
                "table",
                (
                    ["cell", "status", "reason"],
                    [[m["cell"], str(m["status"]), str(m["reason"] or "")] for m in report["not_reported"]],
                ),
            )
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    parts = []
    for kind, content in _sections(report):
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + content)
        elif kind == "text":
            parts.append(content)
        elif kind == "table":
            parts.append(_md_table(*content))
        elif kind == "image":
            parts.append(f"![{content[0]}]({content[1]})")
    return "\n\n".join(parts) + "\n"


def html(report: dict[str, Any]) -> str:
    from html import escape

    def code(text: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escape(text)))

    parts = []
    for kind, content in _sections(report):
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{escape(content)}</{kind}>")
        elif kind == "text":
            parts.append(f"<p>{code(content)}</p>")
        elif kind == "table":
            headers, body = content
            head = "".join(f"<th>{escape(h)}</th>" for h in headers)
            rows = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in body)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "image":
            parts.append(
                f'<figure><img src="{escape(content[1])}" alt="{escape(content[0])}">'
                f"<figcaption>{escape(content[0])}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
        "img{max-width:100%}figure{margin:1em 0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(report['title'])}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


# ---- writing -----------------------------------------------------------------------------------------------------
def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FtctlError(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FtctlError(
                f"report directory {out} already exists; pass --overwrite to replace it or choose another --output"
            )
        if not (out / "report.json").is_file():
            raise FtctlError(
                f"--overwrite refused: {out} is not a report directory (no report.json), so ftctl will "
                "not delete it; choose another --output"
            )
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK):
        raise FtctlError(f"cannot write to {out}: {ancestor} is not writable")


def build(paths: list[str], out: Path, overwrite: bool = False, fmt: str = "md", title: str | None = None) -> dict:
    """Read the runs, then write the report into `out` (staged next to it, then moved in). Returns report.json."""
    from launch import rundir

    _check_output(out, overwrite)
    runs, missing, grids = collect(paths)
    report = assemble(runs, missing, title or ("ftctl report: " + (", ".join(grids) if grids else f"{len(runs)} runs")))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        for task in report["tasks"]:
            task["plots"] = plot_task(task, staging)
        (staging / "report.md").write_text(markdown(report), encoding="utf-8")
        if fmt == "html":
            (staging / "report.html").write_text(html(report), encoding="utf-8")
        rundir.write_json(staging / "report.json", report)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report


def build_parser() -> Any:
    from launch.options import Parser

    parser = Parser(
        prog="ftctl report",
        description="Compare finished runs: per task a table of training cost and metrics before/after "
        "fine-tuning, loss curves, bar charts, confusion matrices, per-entity F1 and per-example score "
        "distributions. Writes report.md, report.json and PNG plots.",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="DIR", help="a grid directory, a folder of run directories, or run directories"
    )
    parser.add_argument("--output", metavar="DIR", help="where to write the report (default: DIR/report for one DIR)")
    parser.add_argument(
        "--format", choices=("md", "html"), default="md", help="md: report.md (default); html: report.html as well"
    )
    parser.add_argument("--title", help="the report's title")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from launch.quiet import quiet

    quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_strict(argv)
    if opts["output"]:
        out = Path(opts["output"])
    elif len(opts["paths"]) == 1:
        out = Path(opts["paths"][0]) / "report"
    else:
        raise FtctlError("several directories given: say where the report goes with --output DIR")
    report = build(opts["paths"], out, opts["overwrite"], opts["format"], opts["title"])
    from rich.console import Console

    shown = "report.html" if opts["format"] == "html" else "report.md"
    Console(highlight=False).print(
        f"wrote {out / shown} ({report['runs']} runs, {len(report['tasks'])} tasks, "
        f"{sum(len(t['plots']) for t in report['tasks'])} plots)",
        markup=False,
    )
    return report


if __name__ == "__main__":
    from launch.errors import run_main

    sys.exit(run_main(main))
