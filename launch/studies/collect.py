"""Report collection: finished runs read from grids, folders and run directories, their baselines found, and every
number the report shows assembled as data (report.json)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from ftctl.errors import FtctlError
from launch.run import rundir
from launch.run.config import resolve_values
from launch.run.console import scalar_metrics
from launch.run.record import device_hours
from launch.studies import analysis
from tasks import TASKS
from tasks.base import ReportsDetails, RowView, ScoresTexts

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
    searched: dict[str, Any] | None = None  # the values its grid's search chose for it
    few_shot: dict[str, Any] | None = None  # the K-shot baseline scored beside the zero-shot one: {k, metrics}


def _read(path: Path, what: str) -> dict[str, Any]:
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
    if scored and isinstance(scored.get("few_shot"), dict):
        run.few_shot = scored["few_shot"]
    return run


@dataclasses.dataclass
class Collected:
    runs: list[Run]
    missing: list[dict[str, Any]]  # grid cells without results
    grids: list[str]  # grid names
    searches: list[dict[str, Any]]  # the grids' searches (grid.json: search), for the search curves


def collect(paths: list[str]) -> Collected:
    """Finished runs, grid cells without results, grid names and searches, from grid directories, folders of runs
    and run directories."""
    found = Collected([], [], [], [])
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise FtctlError(f"not a directory: {given}")
        if (path / "grid.json").is_file():
            _add_grid(found, path)
        elif (path / "run.json").is_file():
            found.runs.append(_run(path, path.name))
        elif (path / "spec.json").is_file():
            raise FtctlError(f"the run in {given} did not finish (no run.json); finish it with --resume first")
        else:
            children = [p for p in sorted(path.iterdir()) if (p / "grid.json").is_file() or (p / "run.json").is_file()]
            if not children:
                raise FtctlError(f"{given} holds no grid (grid.json) or finished run (run.json), nor folders that do")
            for child in children:
                if (child / "grid.json").is_file():
                    _add_grid(found, child)
                else:
                    found.runs.append(_run(child, child.name))
    if not found.runs:
        missing = found.missing
        raise FtctlError(
            "no finished run to report on" + (f" ({len(missing)} grid cells not finished)" if missing else "")
        )
    seen: dict[str, int] = {}
    for run in found.runs:  # the same label from two sources: tell them apart by their folder
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in found.runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.path.parent.name})"
    _share_baselines(found.runs)
    return found


def _add_grid(found: Collected, grid: Path) -> None:
    """A grid's finished cells (with the baseline another cell of the pair scored), the others as missing."""
    state = _read(grid / "grid.json", "grid state")
    found.grids.append(str(state.get("name") or grid.name))
    found.searches.extend(record for record in (state.get("search") or {}).values() if record.get("trials"))
    for cell in state.get("cells", []):
        path = grid / cell["run_dir"]
        if not (path / "run.json").is_file():
            found.missing.append({"cell": cell["id"], "status": cell.get("status"), "reason": cell.get("error")})
            continue
        run = _run(path, cell["id"], cell)
        run.searched = cell.get("searched")
        source = cell.get("baseline_cell")
        if run.baseline is None and source and (grid / source / "eval.json").is_file():
            shared = _read(grid / source / "eval.json", "evaluation")
            if shared.get("baseline") is not None:
                run.baseline_dir, run.baseline = grid / source, shared["baseline"]
            if run.few_shot is None and isinstance(shared.get("few_shot"), dict):
                run.few_shot = shared["few_shot"]
        found.runs.append(run)


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
    known: dict[tuple, Run] = {}
    for run in runs:
        key = _eval_key(run)
        if run.baseline is not None and key:
            known.setdefault(key, run)
    for run in runs:
        key = _eval_key(run)
        if run.baseline is None and key in known:
            source = known[key]
            run.baseline_dir, run.baseline = source.baseline_dir, source.baseline


def _scalars(metrics: dict[str, Any] | None) -> dict[str, float]:
    if not metrics:
        return {}
    return scalar_metrics({k: v for k, v in metrics.items() if k not in ("details", "baseline", "info")})


def _task_class(record: dict[str, Any]) -> Any:
    preset = (record.get("task") or {}).get("preset")
    return TASKS.get(preset).cls if isinstance(preset, str) and preset in TASKS else None


def _metric_order(runs: list[Run], after: dict[str, dict[str, float]]) -> list[str]:
    """The task's metrics, its main one first, then whatever else the runs report (e.g. the loss)."""
    cls = _task_class(runs[0].record)
    declared = [cls.primary_metric, *(m for m in cls.metrics if m != cls.primary_metric)] if cls else []
    seen = [k for r in runs for k in after[r.label]]
    return [m for m in declared if m in seen] + list(dict.fromkeys(k for k in seen if k not in declared))


def _is_number(value: Any) -> TypeGuard[int | float]:
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
    try:
        task = resolve_values(dict(record.get("config") or {})).task
    except FtctlError:
        return None
    return task.score_texts if isinstance(task, ScoresTexts) else None


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def detail_views(run: Run) -> list[dict[str, Any]]:
    """The run's evaluation details as the task draws them (`ReportsDetails`: a confusion matrix, F1 per entity
    type, ...); the report knows only the shapes (matrix, bars), never a task's detail keys."""
    cls = _task_class(run.record)
    if cls is None or not issubclass(cls, ReportsDetails):
        return []
    return [dataclasses.asdict(view) for view in cls.report_details(_details(run))]


def _details(run: Run) -> dict[str, Any]:
    """The non-scalar analysis of the same evaluation the metrics come from."""
    if run.scored:
        return run.scored.get("details") or {}
    return run.record.get("metric_details") or {}


def _size(record: dict[str, Any]) -> dict[str, Any]:
    saved = record.get("saved_weights") or (record.get("method") or {}).get("saved_weights") or {}
    return {"size_mb": saved.get("mb"), "size_bytes": saved.get("bytes")}


def _row(run: Run, after: dict[str, float], metrics: list[str]) -> dict[str, Any]:
    """One run's line of its task's table: cost from run.json, the metric after and before, their difference."""
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
        "device_hours": _device_hours(rec),
        "searched": run.searched,
        "samples_per_second": rec.get("samples_per_second"),
        "tokens_per_second": rec.get("tokens_per_second"),
        "peak_memory_mb": rec.get("peak_memory_mb"),
        # measured / predicted - 1 (`ftctl plan`'s prediction, recorded by the run)
        "plan_memory_error": ((rec.get("plan") or {}).get("error") or {}).get("peak_memory"),
        "plan_time_error": ((rec.get("plan") or {}).get("error") or {}).get("train_time"),
        "after": after,
        "after_source": "eval.json" if run.scored else "run.json metrics (validation)",
        "before": before,
        "baseline_from": str(run.baseline_dir.resolve()) if run.baseline_dir else None,
        "few_shot": {"k": run.few_shot["k"], **_scalars(run.few_shot.get("metrics"))} if run.few_shot else None,
        "delta": {m: after[m] - before[m] for m in metrics if before and m in before and m in after},
        "evaluated_on": (run.scored or {}).get("info", {}).get("data") or (rec.get("data") or {}).get("source"),
        "examples": (run.scored or {}).get("info", {}).get("examples"),
        "history": {
            "train": [(h["step"], h["loss"]) for h in rec.get("history", []) if "loss" in h and "step" in h],
            "eval": [(h["step"], h["eval_loss"]) for h in rec.get("history", []) if "eval_loss" in h and "step" in h],
        },
    }
    views = detail_views(run)
    if views:
        row["details"] = views
    return row


def _device_hours(record: dict[str, Any]) -> float | None:
    """Training time times the processes that trained (one device each on GPUs, one process each on a CPU)."""
    if _is_number(record.get("device_hours")):
        return float(record["device_hours"])
    seconds = record.get("train_runtime_s")  # runs recorded before run.json kept it
    if not _is_number(seconds):
        return None
    return device_hours(float(seconds), int((record.get("launch") or {}).get("num_processes") or 1))


def _add_per_example(rows: list[dict[str, Any]], scores: list[tuple[dict, dict]], metrics: list[str]) -> None:
    """Per-example scores: the task's metrics in its order, at most MAX_SCORE_METRICS of them."""
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


def assemble(collected: Collected, title: str, min_effect: float | None = None) -> dict[str, Any]:
    """Everything the report shows, as data: what report.json holds and the markdown and plots are drawn from.
    `min_effect`: the smallest difference worth finding, which the seeds-needed plan is made for (default: each
    comparison's observed difference)."""
    groups: dict[str, list[Run]] = {}
    for run in collected.runs:
        groups.setdefault(run.task, []).append(run)
    tasks = []
    for name, members in groups.items():
        after = {r.label: _scalars(r.scored) if r.scored else _scalars(r.record.get("metrics")) for r in members}
        metrics = _metric_order(members, after)
        rows, scores, studied = [], [], []
        for run in members:
            rows.append(_row(run, after[run.label], metrics))
            after_rows = _rows(run.path / ("eval_predictions.jsonl" if run.scored else "predictions.jsonl"))
            before_rows = _rows(run.baseline_dir / "eval_baseline_predictions.jsonl") if run.baseline_dir else []
            rec = run.record
            cls = _task_class(rec)
            scores.append((example_scores(after_rows, metrics, rec), example_scores(before_rows, metrics, rec)))
            studied.append(
                {
                    "row": rows[-1],
                    "seed": run.seed,
                    "evaluation": analysis.evaluation(run, after_rows, cls),
                    "after_rows": after_rows,
                    "before_rows": before_rows,
                    "view": cls.row_view if cls is not None else RowView(),
                }
            )
        _add_per_example(rows, scores, metrics)
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
                "before_is": _before_is(first.record),
                "searches": [s for s in collected.searches if s.get("task") == name],
            }
        )
        tasks[-1].update(analysis.analyse(tasks[-1], studied, min_effect))
    return {
        "title": title,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": len(collected.runs),
        "tasks": tasks,
        "not_reported": collected.missing,
    }


def _before_is(record: dict[str, Any]) -> str:
    """What the baseline of this task's runs is, so that "before" never looks like more than it is."""
    if (record.get("task") or {}).get("kind") == "generation":
        return "the base model as it is, prompted the same way (zero-shot)"
    return "the base model with a new, untrained task head (about chance level)"
