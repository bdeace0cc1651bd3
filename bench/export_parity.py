"""ONNX exports of real-model runs, and how closely they predict what the runs do (issue 26's acceptance).

    python -m bench.export_parity

The pretrained MiniLM (all-MiniLM-L6-v2), LoRA, ftctl's defaults otherwise, one epoch on a slice of real data:
SST-2 (2,000 sentences; scored on dev.tsv, 872), CoNLL-2003 NER (1,000 sentences; 500 of eng.testa), STS-B (2,000
pairs; dev.tsv, 1,500). Each run is exported with `ftctl export --format onnx`; the table shows its parity.json
(agreement, the metric of both, the bootstrap interval of the difference, the largest logit difference, export
time) and the agreement ONNX Runtime alone (bench/ort_check.py, no ftctl import) reaches on the run's recorded
predictions.jsonl. Writes bench/results/export_parity.{md,json} and an entry in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench.common import OUT, REPO, ftctl, machine, machine_line, need_data, run, save, versions

RUNS = {
    "sst2": ("glue_sst2/train.tsv", "glue_sst2/dev.tsv", ["--max-train-samples", "2000"]),
    "conll2003": (
        "conll2003/eng.train",
        "conll2003/eng.testa",
        ["--max-train-samples", "1000", "--max-eval-samples", "500"],
    ),
    "stsb": ("glue_stsb/train.tsv", "glue_stsb/dev.tsv", ["--max-train-samples", "2000"]),
}


def main() -> None:
    rows = []
    for task, (train, dev, extra) in RUNS.items():
        train_file, dev_file = need_data(train, dev)
        if task == "sst2":  # dev.tsv names its text column `content`, train.tsv `sentence`: one name for both
            lines = dev_file.read_text(encoding="utf-8").splitlines()
            dev_file = OUT / "sst2-dev.tsv"
            OUT.mkdir(parents=True, exist_ok=True)
            dev_file.write_text("\n".join(["label\tsentence", *lines[1:]]) + "\n", encoding="utf-8")
        out, exported = OUT / f"export-{task}", OUT / f"export-{task}-onnx"
        cmd = [
            ftctl(),
            "train",
            "--task",
            task,
            "--method",
            "lora",
            "--train-file",
            str(train_file),
            "--validation-file",
            str(dev_file),
            *extra,
            "--epochs",
            "1",
            "--precision",
            "fp32",
            "--eval-strategy",
            "no",
            "--save-strategy",
            "no",
            "--report-to",
            "none",
            "--output-dir",
            str(out),
            "--overwrite",
        ]
        run(cmd, OUT / f"export-{task}.train.log")
        wall = run(
            [ftctl(), "export", str(out), "--format", "onnx", "--output", str(exported), "--overwrite"],
            OUT / f"export-{task}.export.log",
        )
        parity = json.loads((exported / "parity.json").read_text())
        check = subprocess.run(
            [sys.executable, str(REPO / "bench" / "ort_check.py"), str(exported), str(out / "predictions.jsonl")],
            capture_output=True,
            text=True,
            check=True,
        )
        ort = json.loads(check.stdout.strip().splitlines()[-1])
        rows.append({"task": task, "export_wall_s": wall, "parity": parity, "ort_alone": ort})
        print(task, parity["agreement"], parity["metric"], ort, flush=True)

    lines = [
        "# ONNX export parity, pretrained MiniLM, LoRA, 1 epoch",
        "",
        machine_line(),
        "",
        "| task | examples | agreement | metric: trained / exported | difference [95% interval] | largest logit "
        "difference | ONNX Runtime alone vs predictions.jsonl | export + parity s |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        p, m, o = r["parity"], r["parity"]["metric"], r["ort_alone"]
        low, high = m["interval"]
        lines.append(
            f"| {r['task']} | {p['examples']} | {100 * p['agreement']:.2f}% | {m['metric']} {m['trained']:.4f} / "
            f"{m['exported']:.4f} | {m['difference']:+.4f} [{low:+.4f}, {high:+.4f}] | "
            f"{p['largest_logit_difference']:.2e} | {o['agree']}/{o['examples']} "
            f"({100 * o['agree'] / o['examples']:.2f}%) | {r['export_wall_s']:.0f} |"
        )
    lines += [
        "",
        "Commands: `python -m bench.export_parity` (each run: `ftctl train --task T --method lora ... "
        "--epochs 1`, then `ftctl export RUN --format onnx --output DIR`).",
    ]
    save("export_parity", {"machine": machine(), "versions": versions(), "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
