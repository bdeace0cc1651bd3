"""SST-2 with the pretrained MiniLM: every method with ftctl's defaults, and the plain-library baseline, in one run.

    python -m bench.sst2_methods                       # every registered method + the plain baseline
    python -m bench.sst2_methods --methods lora dora   # some of them

Trains on the first N sentences of glue_sst2/train.tsv (N = --samples, default 2,000; ftctl holds out a seeded
10% for validation before taking N), scores on the full dev.tsv (872 sentences), and writes
bench/results/sst2_methods.{md,json} plus a dated entry in bench/RESULTS.md: per method the trainable parameters,
reduction %, size of the saved adapter (or model), training throughput, peak memory and dev accuracy. A method that
fails is reported as failed and the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench.common import OUT, ftctl, machine, machine_line, need_data, run, save, versions

# Catalogue order for the table; any other registered method follows.
ORDER = [
    "full",
    "llrd",
    "freeze",
    "head",
    "lora",
    "rslora",
    "dora",
    "adalora",
    "qlora",
    "qlora8",
    "ia3",
    "adapter",
    "prompt_tuning",
    "p_tuning",
    "prefix_tuning",
    "p_tuning_v2",
]
# The methods whose defaults must reach this dev accuracy (issue 4's acceptance).
REQUIRED = {"lora", "dora", "rslora", "adalora", "full", "llrd", "adapter"}
TARGET = 0.80


def all_methods() -> list[str]:
    from methods import METHODS

    return [m for m in ORDER if m in METHODS] + [m for m in METHODS if m not in ORDER]


def bench_method(method: str, train_tsv, dev_tsv, samples: int) -> dict:
    out = OUT / f"sst2-{method}"
    train_cmd = [
        ftctl(),
        "train",
        "--task",
        "sst2",
        "--method",
        method,
        "--train-file",
        str(train_tsv),
        "--max-train-samples",
        str(samples),
        "--max-eval-samples",  # the held-out validation split picks the best epoch; dev.tsv is scored whole
        "500",
        "--output-dir",
        str(out),
        "--overwrite",
    ]
    command = " ".join(train_cmd[1:]).replace(str(train_tsv), "glue_sst2/train.tsv").replace(str(OUT), "bench/out")
    try:
        train_seconds = run(train_cmd, out.parent / f"sst2-{method}.train.log")
        eval_json = out / "dev_eval.json"
        eval_cmd = [
            ftctl(),
            "evaluate",
            str(out),
            "--data",
            str(dev_tsv),
            "--text-column",
            "content",
            "--output",
            str(eval_json),
        ]
        eval_seconds = run(eval_cmd, out.parent / f"sst2-{method}.eval.log")
    except SystemExit as exc:  # bench.common.run exits on a failed step; report it and go on with the others
        return {"method": method, "error": str(exc), "command": command}
    record = json.loads((out / "run.json").read_text())
    scored = json.loads(eval_json.read_text())
    return {
        "method": method,
        "trainable_params": record["trainable_params"],
        "total_params": record["total_params"],
        "reduction_percent": record["reduction_percent"],
        "saved_mb": record["saved_weights"]["mb"],
        "saved_files": record["saved_weights"]["files"],
        "train_runtime_s": record["train_runtime_s"],
        "samples_per_second": record["samples_per_second"],
        "tokens_per_second": record["tokens_per_second"],
        "peak_memory_mb": record["peak_memory_mb"],
        "precision": record["precision"],
        "learning_rate": record["config"]["learning_rate"],
        "epochs": record["config"]["epochs"],
        "validation_accuracy": record["metrics"]["accuracy"],
        "dev_accuracy": scored["accuracy"],
        "dev_f1": scored["f1"],
        "method_facts": {k: v for k, v in record["method"].items() if k not in ("trained_modules", "description")},
        "command_wall_s": train_seconds + eval_seconds,
        "command": command,
    }


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| method | trainable params | reduction % | saved MB | precision | lr | epochs | train s | samples/s | "
        "tokens/s | peak MB | dev acc | dev F1 | wall s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * 12)
            continue
        mark = " **(>= 0.80 required)**" if r["method"] in REQUIRED else ""
        lines.append(
            f"| {r['method']}{mark} | {r['trainable_params']:,} | {r['reduction_percent']:.2f} | {r['saved_mb']:.2f} | "
            f"{r['precision']} | {r['learning_rate']:g} | {r['epochs']:g} | {r['train_runtime_s']:.0f} | "
            f"{r['samples_per_second']:.1f} | {r['tokens_per_second']:.0f} | {r['peak_memory_mb']:.0f} | "
            f"{r['dev_accuracy']:.4f} | {r['dev_f1']:.4f} | {r['command_wall_s']:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    train_tsv, dev_tsv = need_data("glue_sst2/train.tsv", "glue_sst2/dev.tsv")
    from ftctl.models import embedded_model_dir

    model = embedded_model_dir()
    rows = []
    for method in args.methods or all_methods():
        row = bench_method(method, train_tsv, dev_tsv, args.samples)
        rows.append(row)
        status = row.get("error") or f"dev accuracy {row['dev_accuracy']:.4f}, {row['command_wall_s']:.0f} s"
        print(f"{method}: {status}", flush=True)

    baseline = None
    if not args.skip_baseline:
        log = OUT / "sst2-plain-baseline.log"
        cmd = [
            sys.executable,
            "-m",
            "bench.baselines.plain_trainer",
            "--job",
            "sst2",
            "--method",
            "lora",
            "--model",
            model,
            "--train",
            str(train_tsv),
            "--dev",
            str(dev_tsv),
            "--samples",
            str(args.samples),
            "--output-dir",
            str(OUT / "sst2-plain"),
        ]
        wall = run(cmd, log)
        baseline = json.loads(log.read_text().strip().splitlines()[-1])
        baseline["command_wall_s"] = wall
        baseline["dev_accuracy"] = baseline["metrics"]["accuracy"]
        print(f"plain baseline: dev accuracy {baseline['dev_accuracy']:.4f}, {wall:.0f} s", flush=True)

    done = [r for r in rows if "error" not in r]
    required = [r for r in done if r["method"] in REQUIRED]
    short = [f"{r['method']} {r['dev_accuracy']:.3f}" for r in required if r["dev_accuracy"] < TARGET]
    missing = sorted(REQUIRED & {r["method"] for r in rows} - {r["method"] for r in done})
    lines = [
        "# SST-2, pretrained MiniLM (all-MiniLM-L6-v2), ftctl defaults per method",
        "",
        machine_line(),
        f"- data: {args.samples:,} sentences of glue_sst2/train.tsv (seeded 10% validation hold-out first), "
        "scored on all 872 sentences of dev.tsv",
        "- command per method: `ftctl train --task sst2 --method M --train-file glue_sst2/train.tsv "
        f"--max-train-samples {args.samples} --max-eval-samples 500` then `ftctl evaluate RUN --data dev.tsv "
        "--text-column content`; every other setting is the method's default for classification",
        "- saved MB: the adapter (PEFT methods, bottleneck adapters: adapter + task head) or the full model on disk; "
        "samples/s: training throughput; peak MB: peak resident memory of the training process (CPU)",
        "",
        *table(rows),
        "",
        f"Required >= {TARGET:.2f} dev accuracy ({', '.join(sorted(REQUIRED))}): "
        + (
            "all reached."
            if not short and not missing and len(required) == len(REQUIRED & {r["method"] for r in rows})
            else f"below: {', '.join(short) or '-'}; failed: {', '.join(missing) or '-'}."
        ),
    ]
    prompts = [
        f"{r['method']} {r['dev_accuracy']:.3f}"
        for r in done
        if r["method"].endswith("tuning") or r["method"].startswith("p_tuning")
    ]
    if prompts:
        lines.append(f"Soft-prompt methods (no accuracy required) reach: {', '.join(prompts)}.")
    if baseline:
        lines += [
            "",
            "Baseline measured in the same run, `python -m bench.baselines.plain_trainer --job sst2 --method lora` "
            "(transformers Trainer + "
            "peft LoRA query/value r=8 alpha 16, lr 5e-4, batch 16, 2 epochs, dynamic padding, first "
            f"{args.samples:,} sentences): dev accuracy {baseline['dev_accuracy']:.4f}, "
            f"{baseline['samples_per_second']:.1f} samples/s, {baseline['train_runtime_s']:.0f} s training, "
            f"{baseline['command_wall_s']:.0f} s wall.",
        ]
    save(
        "sst2_methods",
        {"machine": machine(), "versions": versions(), "rows": rows, "baseline": baseline},
        "\n".join(lines) + "\n",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
