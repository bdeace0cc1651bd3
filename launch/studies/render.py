"""The report as text: its tables, and Markdown and HTML documents made of the same sections."""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path
from typing import Any

from launch.studies.collect import _is_number
from launch.studies.plots import _name


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
        "hours": f"{value:.4f}",
        "error": f"{100 * value:+.1f}%",
    }[kind]


COLUMNS = (  # (header, row key, format)
    ("trainable params", "trainable_params", "int"),
    ("reduction %", "reduction_percent", "pct"),
    ("size (MB)", "size_mb", "mb"),
    ("train time (s)", "train_runtime_s", "s"),
    ("samples/s", "samples_per_second", "rate"),
    ("peak memory (MB)", "peak_memory_mb", "mem"),
    ("memory vs plan", "plan_memory_error", "error"),
    ("device-hours", "device_hours", "hours"),
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


def _bars_table(task: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The `bars` details (e.g. F1 per entity type) as a table: an item per line, a run per column."""
    views = [(row, v) for row in task["rows"] for v in row.get("details", []) if v["kind"] == "bars"]
    if not views:
        return None
    items = sorted({label for _, v in views for label in v["labels"]})
    headers = [views[0][1]["value_name"] or "item"] + [_name(task, row) for row, _ in views]
    values = [dict(zip(v["labels"], v["values"], strict=True)) for _, v in views]
    body = [[item] + [_fmt(per.get(item), "metric") for per in values] for item in items]
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
    "from `run.json` where it was not evaluated), on the data named per task. **before**: the base model before "
    "fine-tuning, on the same data (`ftctl evaluate --baseline`; what it is for each task is said under its heading). "
    "**Δ** = after - before. Trainable params, reduction % (the share of parameters left frozen), size of the saved "
    "weights (the adapter for PEFT methods), training time (training steps only, without the evaluations), training "
    "samples/s and peak memory (CUDA allocated on a GPU, process RSS on CPU) come from each run's `run.json`; "
    "device-hours are training time x processes (summed under each table). **memory vs plan**: the measured peak "
    "against the one `ftctl plan` predicted before the run (measured / predicted - 1; `plan` in `run.json`)."
)


def _interval(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("mean") is None:
        return "-"
    text = _fmt(summary["mean"], "metric")
    if summary.get("ci"):
        low, high = summary["ci"]
        text += f" [{_fmt(low, 'metric')}, {_fmt(high, 'metric')}]"
    return text


def headline(task: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per (model, method): the main metric with its interval, the change from the baseline, the cost."""
    primary = task.get("primary")
    shots = next((g["few_shot"]["k"] for g in task.get("groups", []) if g.get("few_shot")), None)
    headers = ["", "model", "method", "seeds", f"{primary} [95% CI]", f"{primary} Δ vs before"]
    headers += [f"{primary} {shots}-shot"] if shots else []
    headers += ["trainable %", "train time (s)", "peak memory (MB)", "device-hours", "searched"]
    body = []
    for group in task.get("groups", []):
        mark = "★" if group.get("best") else "≈" if group.get("indistinguishable") else ""
        searched = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (group["searched"] or {}).items()
        )
        body.append(
            [
                mark,
                str(group["model"]),
                str(group["method"]),
                str(len(group["seeds"])),
                _interval(group["metrics"].get(primary)),
                _fmt(group["delta"].get(primary), "delta"),
                *([_fmt((group.get("few_shot") or {}).get(primary), "metric")] if shots else []),
                _fmt(group["trainable_percent"], "pct"),
                _fmt(group["train_runtime_s"], "s"),
                _fmt(group["peak_memory_mb"], "mem"),
                f"{group['device_hours']:.4f}" if _is_number(group["device_hours"]) else "-",
                searched or "-",
            ]
        )
    return headers, body


def _seeds_needed(plan: dict[str, Any]) -> str:
    if plan.get("seeds") is None:
        return f"- ({plan['why']})" if plan.get("why") else "-"
    hours = plan.get("device_hours")
    return f"{plan['seeds']}" + (f" ({hours:.3f} device-h)" if hours else "")


def _p(value: float) -> str:
    return f"{value:.3f}" if value >= 0.001 else "<0.001"


def comparisons(task: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["comparison", f"Δ {task.get('primary')}", "95% CI", "p (Holm)", "verdict", "paired on",
               "seeds to resolve Δ (80%)", "flips (best / other)"]  # fmt: skip
    body = []
    for c in task.get("comparisons", []):
        if not c.get("paired"):
            body.append([f"{c['a']} vs {c['b']}", "-", "-", "-", c["reason"], "-", "-", "-"])
            continue
        flips = c.get("flips") or {}
        body.append(
            [
                f"{c['a']} vs {c['b']}",
                _fmt(c["difference"], "delta"),
                f"[{_fmt(c['ci'][0], 'delta')}, {_fmt(c['ci'][1], 'delta')}]",
                f"{_p(c['p_value'])} ({_p(c['holm'])})",
                c["verdict"],
                f"{c['seeds']} seed(s) x {c['examples']:,} examples",
                _seeds_needed(c.get("seeds_needed") or {}),
                f"{flips['fixed']} / {flips['broken']}" if flips else "-",
            ]
        )
    return headers, body


def flips(task: dict[str, Any]) -> tuple[tuple[list[str], list[list[str]]], tuple[list[str], list[list[str]]]] | None:
    """Examples fine-tuning fixed and broke against the baseline: counts per group (over its seeds), and a few."""
    counted, shown = [], []
    for group in task.get("groups", []):
        found = group.get("flips") or []
        if not found:
            continue
        name = f"{group['model']} / {group['method']}"
        counted.append(
            [name, str(sum(f["examples"] for f in found)), str(sum(f["fixed"] for f in found)),
             str(sum(f["broken"] for f in found))]
        )  # fmt: skip
        for direction in ("fixed", "broken"):
            for example in found[0][f"{direction}_shown"]:
                shown.append(
                    [name, direction, str(example["input"])[:120], str(example["gold"])[:60],
                     str(example["before"])[:60], str(example["prediction"])[:60]]
                )  # fmt: skip
    if not counted:
        return None
    return (
        (
            [
                "model / method",
                "examples compared",
                "fixed (wrong before, right after)",
                "broken (right before, wrong after)",
            ],
            counted,
        ),
        (["model / method", "flip", "input", "gold", "before", "after"], shown),
    )


def disagreement_examples(task: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """A few examples the best method gets right and another wrong, and the reverse."""
    body = []
    for c in task.get("comparisons", []):
        flips = c.get("flips") or {}
        for key, who in (("fixed_shown", f"only {c['a']} right"), ("broken_shown", f"only {c['b']} right")):
            for example in flips.get(key, []):
                body.append(
                    [f"{c['a']} vs {c['b']}", who, str(example["input"])[:120], str(example["gold"])[:60],
                     str(example["prediction"])[:60], str(example["before"])[:60]]
                )  # fmt: skip
    return ["comparison", "who is right", "input", "gold", "best's answer", "other's answer"], body


PLOTS = (
    ("pareto", "the main metric against cost (trainable parameters, training time, peak memory); the line joins the "
     "results no other beats on both metric and cost"),
    ("metrics", "before and after fine-tuning, per metric (error bars: 95% intervals)"),
    ("search", "search curves: each method's trials, scored on a split of the training data (x: pruned early)"),
)  # fmt: skip
APPENDIX_PLOTS = (
    ("loss", "loss curves"),
    ("matrix", "confusion matrices"),
    ("bars", "per-item scores (e.g. F1 per entity type)"),
    ("scores", "per-example score distributions"),
    ("scatter", "per example, before vs after (y = x: no change)"),
)


def _task_sections(task: dict[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [("h2", f"{task['task']} ({task['kind']})")]
    out.append(("text", "Evaluated on: " + "; ".join(f"`{d}`" for d in task["evaluated_on"])))
    out.append(("text", f"**before** is {task['before_is']}."))
    if task.get("groups"):
        out.append(("table", headline(task)))
        methods = sorted({g["metrics"][task["primary"]].get("ci_method") or "" for g in task["groups"]
                          if task["primary"] in g["metrics"]} - {""})  # fmt: skip
        legend = "★ best on the main metric; ≈ not distinguishable from it (its Holm-adjusted p-value, over all the "
        legend += "comparisons with the best, is 0.05 or more). Intervals: " + (
            "; ".join(methods) if methods else "none (one run, no per-example predictions)"
        )
        out.append(("text", legend + ". Training time and peak memory are means over seeds; device-hours sum them."))
    if task.get("comparisons"):
        out.append(("h3", "Paired comparisons with the best"))
        out.append(("table", comparisons(task)))
        out.append(("text", "p: the paired bootstrap's two-sided p-value; in brackets, Holm-adjusted over this "
                            "table's comparisons (statsmodels), which the verdict reads at 0.05."))  # fmt: skip
        disagreements = disagreement_examples(task)
        if disagreements[1]:
            out.append(("text", "Where they disagree (first paired seed; a few of each):"))
            out.append(("table", disagreements))
    flipped = flips(task)
    if flipped:
        out.append(("h3", "Flips against the baseline"))
        out.append(("table", flipped[0]))
        if flipped[1][1]:
            out.append(("table", flipped[1]))
    plots = task.get("plots", {})
    for kind, caption in PLOTS:
        if kind in plots:
            out.append(("image", (caption, plots[kind])))
    out.append(("h3", "Appendix: every run"))
    out.append(("table", table(task)))
    hours = [r["device_hours"] for r in task["rows"] if _is_number(r.get("device_hours"))]
    if hours:
        out.append(("text", f"Device-hours, all {len(hours)} runs of this task: {sum(hours):.4f}."))
    shared = {r["baseline_from"] for r in task["rows"] if r["baseline_from"]}
    if shared and len(shared) < len(task["rows"]):
        note = (
            "The baseline is scored once per base model and evaluation data, and shared by the runs that fine-tune it."
        )
        out.append(("text", note))
    for kind, caption in APPENDIX_PLOTS:
        if kind in plots:
            out.append(("image", (caption, plots[kind])))
        bars = _bars_table(task) if kind == "bars" else None
        if bars:
            title = next(v["title"] for r in task["rows"] for v in r.get("details", []) if v["kind"] == "bars")
            out.append(("h3", title))
            out.append(("table", bars))
        if kind == "scores" and _score_table(task):
            out.append(("h3", "Per-example scores"))
            out.append(("table", _score_table(task)))
    return out


def _total_hours(report: dict[str, Any]) -> str:
    """The study's cost: device-hours summed over every run reported."""
    hours = [r["device_hours"] for t in report["tasks"] for r in t["rows"] if _is_number(r.get("device_hours"))]
    return f", {sum(hours):.4f} device-hours in all" if hours else ""


def _sections(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report as a sequence of (kind, content): heading, text, table, image."""
    out: list[tuple[str, Any]] = [
        ("h1", report["title"]),
        (
            "text",
            (
                f"{report['runs']} runs over {len(report['tasks'])} task(s){_total_hours(report)}; written "
                f"{report['generated']} by `ftctl report`. The same numbers, unrounded: `report.json`."
            ),
        ),
        ("text", EXPLAIN),
    ]
    for task in report["tasks"]:
        out += _task_sections(task)
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


def html(report: dict[str, Any], folder: Path) -> str:
    """One self-contained page: the plots in `folder` are inlined (data URIs), so the file can be mailed or
    attached as is."""

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
            data = base64.b64encode((folder / content[1]).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{escape(content[0])}">'
                f"<figcaption>{escape(content[0])}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f3f3f3}"
        "img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:13px}"
        "td:first-child{text-align:left}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(report['title'])}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
