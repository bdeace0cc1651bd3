"""The report as text: its tables, and Markdown and HTML documents made of the same sections."""

from __future__ import annotations

import re
from html import escape
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
            ("matrix", "confusion matrices"),
            ("bars", "per-item scores (e.g. F1 per entity type)"),
            ("scores", "per-example score distributions"),
            ("scatter", "per example, before vs after (y = x: no change)"),
        ):
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
