"""Classic NLP tasks on real data with the pretrained MiniLM, ftctl's defaults (LoRA), one command each.

    python -m bench.tasks_real                     # conll2003 NER, STS-B, SQuAD sample
    python -m bench.tasks_real --tasks ner stsb    # a subset

- NER: the first N sentences of conll2003/eng.train (N = --ner-samples, default 4,000), scored on all of eng.testa
  (entity-level micro F1, seqeval). Acceptance: F1 >= 0.80.
- STS-B: glue_stsb/train.tsv (all 5,749 pairs), scored on dev.tsv (1,500). Acceptance: Pearson >= 0.80.
- SQuAD: trained on the first article of the v1.1 train set (269 questions), scored on the first dev article
  (810 questions) through the full window / n-best / official EM-F1 path. A pipeline check: one article is far too
  little to learn extractive QA from a sentence-embedding model.

Writes bench/results/tasks_real.{md,json} and a dated entry in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json

from bench.common import OUT, ftctl, machine, machine_line, need_data, run, save, versions

TASKS = ("ner", "stsb", "squad")


def spec(name: str, args: argparse.Namespace) -> dict:
    if name == "ner":
        train, dev = need_data("conll2003/eng.train", "conll2003/eng.testa")
        return {
            "task": "conll2003",
            "data": f"first {args.ner_samples:,} sentences of conll2003/eng.train; scored on eng.testa",
            "argv": ["--train-file", train, "--validation-file", dev, "--max-train-samples", str(args.ner_samples)],
            "metrics": ("f1", "precision", "recall", "accuracy"),
            "goal": ("f1", 0.80),
        }
    if name == "stsb":
        train, dev = need_data("glue_stsb/train.tsv", "glue_stsb/dev.tsv")
        return {
            "task": "stsb",
            "data": f"glue_stsb/train.tsv ({args.stsb_samples or 5749:,} pairs); scored on dev.tsv (1,500)",
            "argv": ["--train-file", train, "--validation-file", dev]
            + (["--max-train-samples", str(args.stsb_samples)] if args.stsb_samples else []),
            "metrics": ("pearson", "spearman", "mse"),
            "goal": ("pearson", 0.80),
        }
    train, dev = need_data(
        "squad_v1.1_sample/train-v1.1_first_article.json", "squad_v1.1_sample/dev-v1.1_first_article.json"
    )
    return {
        "task": "squad",
        "data": "SQuAD v1.1 first train article (269 questions); scored on the first dev article (810)",
        "argv": ["--train-file", train, "--validation-file", dev, "--epochs", "5", "--learning-rate", "1e-3"],
        "metrics": ("exact_match", "f1"),
        "goal": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--method", default="lora")
    parser.add_argument("--ner-samples", type=int, default=4000)
    parser.add_argument("--stsb-samples", type=int, help="use the first N STS-B training pairs (default: all)")
    parser.add_argument("--epochs", type=float, help="override the method's default epochs")
    parser.add_argument(
        "--final-eval-only", action="store_true", help="score the validation data once, after training (faster)"
    )
    args = parser.parse_args()
    rows = []
    for name in args.tasks:
        s = spec(name, args)
        out = OUT / f"{name}-{args.method}"
        argv = [str(a) for a in s["argv"]]
        cmd = [ftctl(), "train", "--task", s["task"], "--method", args.method, *argv, "--output-dir", str(out)]
        cmd += ["--overwrite", "--report-to", "none"]
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        if args.final_eval_only:
            cmd += ["--eval-strategy", "no", "--save-strategy", "no"]
        wall = run(cmd, OUT / f"{name}-{args.method}.train.log")
        record = json.loads((out / "run.json").read_text())
        metrics = record["metrics"]
        goal = s["goal"]
        rows.append(
            {
                "task": s["task"],
                "data": s["data"],
                "method": args.method,
                "precision": record["precision"],
                "learning_rate": record["config"]["learning_rate"],
                "epochs": record["config"]["epochs"],
                "trainable_params": record["trainable_params"],
                "train_runtime_s": record["train_runtime_s"],
                "samples_per_second": record["samples_per_second"],
                "peak_memory_mb": record["peak_memory_mb"],
                "command_wall_s": wall,
                "metrics": {k: metrics[k] for k in s["metrics"]},
                "goal": f"{goal[0]} >= {goal[1]}" if goal else "pipeline check",
                "met": bool(metrics[goal[0]] >= goal[1]) if goal else None,
                "command": "ftctl "
                + " ".join(cmd[1:]).replace(str(need_data("")[0]) + "/", "").replace(str(OUT), "bench/out"),
            }
        )
        print(f"{name}: {rows[-1]['metrics']} in {wall:.0f} s", flush=True)

    lines = [
        "# Classic NLP tasks, pretrained MiniLM (all-MiniLM-L6-v2), ftctl defaults",
        "",
        machine_line(),
        "",
        "| task | data | method | precision | lr | epochs | trainable | train s | samples/s | peak MB | wall s "
        "| metrics | goal |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        shown = ", ".join(f"{k} {v:.4f}" if abs(v) <= 1 else f"{k} {v:.2f}" for k, v in r["metrics"].items())
        verdict = r["goal"] + (" (met)" if r["met"] else " (NOT met)" if r["met"] is False else "")
        lines.append(
            f"| {r['task']} | {r['data']} | {r['method']} | {r['precision']} | {r['learning_rate']:g} | "
            f"{r['epochs']:g} | {r['trainable_params']:,} | {r['train_runtime_s']:.0f} | "
            f"{r['samples_per_second']:.1f} | {r['peak_memory_mb']:.0f} | {r['command_wall_s']:.0f} | {shown} | "
            f"{verdict} |"
        )
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in rows]
    save(
        f"tasks_real_{'_'.join(args.tasks)}",
        {"machine": machine(), "versions": versions(), "rows": rows},
        "\n".join(lines) + "\n",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
