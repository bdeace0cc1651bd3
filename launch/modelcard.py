"""The model card (README.md) written into every run directory. Holds no secrets: no tokens, no environment."""

from __future__ import annotations

from typing import Any

from launch.console import fmt, scalar_metrics


def model_card(record: dict[str, Any]) -> str:
    task, method, model = record["task"], record["method"], record["model"]
    cfg = record["config"]
    library = "peft" if method["peft"] else "transformers"
    base = model.get("hub_id") or model["name_or_path"]
    lines = [
        "---",
        f"library_name: {library}",
        f"base_model: {base}",
        f"pipeline_tag: {task['pipeline_tag']}",
        "tags:",
        "- ftctl",
        f"- {task['preset']}",
        f"- {method['name']}",
        "---",
        "",
        f"# {base}: {task['preset']} with {method['name']}",
        "",
        f"Fine-tuned with [ftctl](https://pypi.org/project/ftctl/) on {record['data']['source']} "
        f"({record['data']['train_examples']:,} training examples).",
        "",
        "## Results",
        "",
        "| split | metric | value |",
        "|---|---|---|",
    ]
    for split, metrics in (("validation", record.get("metrics") or {}), ("test", record.get("test_metrics") or {})):
        for key, value in scalar_metrics(metrics).items():
            lines.append(f"| {split} | {key} | {fmt(value)} |")
    lines += [
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {method['name']} ({method['description']}) |",
        f"| trainable parameters | {record['trainable_params']:,} of {record['total_params']:,} "
        f"({record['trainable_percent']:.3f}%) |",
    ]
    for key in (
        "epochs",
        "max_steps",
        "batch_size",
        "learning_rate",
        "lr_scheduler",
        "warmup_ratio",
        "weight_decay",
        "max_length",
        "seed",
        "precision",
    ):
        lines.append(f"| {key} | {cfg.get(key)} |")
    lines += [
        f"| training time | {record['train_runtime_s']:.1f} s on {record['device']['name']} |",
        "",
        "## Use it",
        "",
        "```python",
    ]
    auto = task["auto_model"]
    extra = "".join(f", {k}={v!r}" for k, v in task["load_args"].items())
    if method["peft"]:
        lines += [
            "from peft import PeftModel",
            f"from transformers import {auto}, AutoTokenizer",
            "",
            f'base = {auto}.from_pretrained("{model["name_or_path"]}"{extra})',
            'model = PeftModel.from_pretrained(base, "<this directory>")',
        ]
    else:
        lines += [
            f"from transformers import {auto}, AutoTokenizer",
            "",
            f'model = {auto}.from_pretrained("<this directory>")',
        ]
    lines += ['tokenizer = AutoTokenizer.from_pretrained("<this directory>")', "```", ""]
    return "\n".join(lines)
