"""Generative tasks end to end on the small real samples in ../shared/data, with tiny random models: a pipeline
check (reading, prompts, training, generation, metrics, predictions, `evaluate --baseline`), not a quality result.

    python -m bench.tasks_generative

No pretrained generative model ships offline, so a tiny T5 (encoder-decoder) and a tiny GPT-2 (decoder) are built
here with a byte-level BPE tokenizer trained on the samples' own text. Runs WMT16 en-ro (`wmt_en_ro`
train/val JSON), XSum (`xsum/sample.json`, 10% held out), Alpaca (`alpaca_data_1k.json`, 10% held out) and SQuAD
answered by generation (the first SQuAD v1.1 dev article), each on both families. Writes
bench/results/tasks_generative.{md,json} and a dated entry in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import OUT, ftctl, machine, machine_line, need_data, run, save, versions
from bench.tiny_models import build_models

FIXTURES = "hf_test_fixtures"


def corpus(paths: list[Path]) -> list[str]:
    """Every string value in the sample files (their JSON layouts differ), as tokenizer training text."""
    texts: list[str] = []

    def walk(value) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    decoder = json.JSONDecoder()
    for path in paths:
        text, at = path.read_text(encoding="utf-8"), 0
        while at < len(text):
            while at < len(text) and text[at].isspace():
                at += 1
            if at < len(text):
                value, at = decoder.raw_decode(text, at)
                walk(value)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3)
    args = parser.parse_args()
    wmt_train, wmt_val, xsum, alpaca, squad = need_data(
        f"{FIXTURES}/wmt_en_ro/train.json",
        f"{FIXTURES}/wmt_en_ro/val.json",
        f"{FIXTURES}/xsum/sample.json",
        "alpaca/alpaca_data_1k.json",
        "squad_v1.1_sample/dev-v1.1_first_article.json",
    )
    models = build_models(corpus([wmt_train, wmt_val, xsum, alpaca]), OUT / "tiny-generative")
    jobs = [
        ("wmt16_en_ro", ["--train-file", wmt_train, "--validation-file", wmt_val], "wmt_en_ro train.json / val.json"),
        ("xsum", ["--train-file", xsum], "xsum/sample.json (10% held out)"),
        ("alpaca", ["--train-file", alpaca, "--max-train-samples", "300", "--max-eval-samples", "30"],
         "alpaca_data_1k.json: 300 train, 30 held out"),
        ("squad_gen", ["--train-file", squad, "--max-train-samples", "300", "--max-eval-samples", "30"],
         "SQuAD v1.1 first dev article: 300 train, 30 held out"),
    ]  # fmt: skip
    rows = []
    for task, data, described in jobs:
        for family, model in models.items():
            out = OUT / f"gen-{task}-{family}"
            cmd = [ftctl(), "train", "--task", task, "--model", str(model), *map(str, data), "--output-dir", str(out)]
            cmd += ["--overwrite", "--report-to", "none", "--epochs", str(args.epochs), "--learning-rate", "1e-3"]
            cmd += ["--max-length", "384", "--max-new-tokens", "32", "--eval-strategy", "no", "--save-strategy", "no"]
            wall = run(cmd, OUT / f"gen-{task}-{family}.train.log")
            wall += run([ftctl(), "evaluate", str(out), "--baseline"], OUT / f"gen-{task}-{family}.eval.log")
            record = json.loads((out / "run.json").read_text())
            scored = json.loads((out / "eval.json").read_text())
            keys = [k for k in scored if isinstance(scored[k], float) and k not in ("loss",)]
            sample = json.loads((out / "eval_predictions.jsonl").read_text().splitlines()[0])
            rows.append(
                {
                    "task": task,
                    "family": family,
                    "data": described,
                    "train_examples": record["data"]["train_examples"],
                    "train_runtime_s": record["train_runtime_s"],
                    "wall_s": wall,
                    "metrics": {k: scored[k] for k in keys},
                    "baseline": {k: scored["baseline"][k] for k in keys if k in scored["baseline"]},
                    "eval_loss": scored.get("loss"),
                    "baseline_eval_loss": scored["baseline"].get("loss"),
                    "first_prediction": str(sample.get("prediction", sample.get("generated", "")))[:80],
                }
            )
            print(f"{task}/{family}: {rows[-1]['metrics']} in {wall:.0f} s", flush=True)

    lines = [
        "# Generative tasks on the small real samples, tiny random models (pipeline check)",
        "",
        machine_line(),
        "- models: 2-layer T5 (d_model 64) and GPT-2 (n_embd 64), random weights, byte-level BPE (2,000 tokens) "
        f"trained on the samples; LoRA defaults, lr 1e-3, {args.epochs:g} epochs, `--max-new-tokens 32`",
        "- the numbers show the pipeline runs and learns (eval loss falls from the untrained baseline); random tiny "
        "models do not produce useful text",
        "",
        "| task | family | data | train ex. | train s | wall s | eval loss (baseline -> tuned) | metrics |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        shown = ", ".join(f"{k} {v:.3g}" for k, v in r["metrics"].items())
        loss = f"{r['baseline_eval_loss']:.3f} -> {r['eval_loss']:.3f}" if r["eval_loss"] else ""
        lines.append(
            f"| {r['task']} | {r['family']} | {r['data']} | {r['train_examples']} | {r['train_runtime_s']:.0f} | "
            f"{r['wall_s']:.0f} | {loss} | {shown} |"
        )
    save("tasks_generative", {"machine": machine(), "versions": versions(), "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
