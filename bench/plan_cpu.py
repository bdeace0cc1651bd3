"""The planner's predicted peak memory (launch/plan.py) against what real training runs measure, on the CPU: the
embedded pretrained MiniLM on real SST-2 sentences, one run per method family.

    python -m bench.plan_cpu

Each run is `ftctl train` in its own process (1 torch thread), max length 12 (most SST-2 sentences are longer, so
most batches have the planned, longest, shape), batch 16, 8 steps, fp32. The run records its prediction (made
before any weight is read) and the measured side: on the CPU, torch's allocations over one profiled optimizer step
of the planned shape plus the tensors alive when it began. Time: FLOPs over a matrix-product rate measured on the
run's own shapes, against the measured training time. Writes bench/results/plan_cpu.{json,md}.
"""

from __future__ import annotations

import json
import os

from bench.common import OUT, ftctl, invocation_line, need_data, run, save

METHODS = ["full", "lora", "qlora", "prefix_tuning", "adapter", "head"]


def main() -> None:
    (sst2,) = need_data("glue_sst2/train.tsv")
    rows = []
    os.environ.update(OMP_NUM_THREADS="1", FTCTL_CPU_BF16="0")
    for method in METHODS:
        out = OUT / "plan_cpu" / method
        cmd = [ftctl(), "train", "--task", "sst2", "--method", method, "--train-file", str(sst2)]
        cmd += ["--max-train-samples", "400", "--max-length", "12", "--batch-size", "16", "--max-steps", "8"]
        cmd += ["--eval-strategy", "no", "--report-to", "none", "--output-dir", str(out), "--overwrite"]
        run(cmd, out.with_suffix(".log"))
        plan = json.loads((out / "run.json").read_text())["plan"]
        predicted, measured = plan["predicted"], plan["measured"]
        rows.append(
            {
                "method": method,
                "predicted_mb": predicted["peak_memory_mb"],
                "parts_mb": predicted["parts_mb"],
                "measured_mb": measured["peak_memory_mb"],
                "memory_error": plan["error"]["peak_memory"],
                "predicted_train_s": predicted["train_seconds"],
                "measured_train_s": measured["train_seconds"],
                "time_error": plan["error"]["train_time"],
            }
        )
    lines = [
        "# Planner: predicted vs measured peak memory, CPU",
        "",
        invocation_line("bench.plan_cpu"),
        "MiniLM (embedded, pretrained), SST-2 train sentences, max length 12, batch 16, 8 steps, fp32, 1 thread.",
        "",
        "| method | predicted MiB | measured MiB | error | parts (MiB) | predicted / measured train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        parts = ", ".join(f"{k} {v}" for k, v in r["parts_mb"].items())
        error = "-" if r["memory_error"] is None else f"{100 * r['memory_error']:+.1f}%"
        lines.append(
            f"| {r['method']} | {r['predicted_mb']:.1f} | {r['measured_mb'] or 0:.1f} | {error} | {parts} | "
            f"{r['predicted_train_s'] or 0:.2f} / {r['measured_train_s']:.2f} |"
        )
    lines += [
        "",
        "Memory error = measured / predicted - 1. Time is a lower bound (FLOPs over the rate of one matrix product "
        "of the run's shapes): at these tiny shapes Python and per-operation overhead, which it leaves out, dominate.",
    ]
    save("plan_cpu", {"rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
