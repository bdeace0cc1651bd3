"""The GPU benchmark, sized for a short device lease: `python -m bench.gpu` (about 8 minutes on one H100/H200).

Llama-3.1-8B and Llama-3.2-1B shapes with random weights, bf16, micro-batch 1, gradient checkpointing; ftctl and the
plain transformers + peft Trainer (dynamic padding, group_by_length: bench/baselines/plain_trainer.py) on the same
model and data in the same run. Rows:

- `8b_lora`: LoRA r=16 on every linear layer (q, k, v, o, gate, up, down), sequence 2,048; ftctl (its memory-lean
  loss, `--loss-kernel auto`), ftctl with the model's own loss (`--loss-kernel plain`), plain (b). Targets: >= 1.5x
  plain (b)'s tokens/s at no more peak memory;
- `8b_lora_4096`: the same at 4,096 tokens. Target: MFU >= 45%;
- `8b_qlora`: QLoRA (4-bit NF4, double quantization), 2,048. Target: peak <= 8 GiB. Needs bitsandbytes: without it
  the row says so and is skipped;
- `1b_lora`, `1b_full`: the 1B shape, LoRA and full fine-tuning;
- `1b_packing`: examples of varied length (64 to 2,048 tokens): ftctl `--packing`, ftctl padded, plain (b);
- a host-sync count: the syncs a CUDA training loop makes, with torch.cuda.set_sync_debug_mode (CUDA only).

Each row prints tokens/s over the training time, MFU (6 x parameters x tokens/s over the device's measured bf16
matrix-multiply rate) and the process's peak CUDA memory. Results go to bench/results/perf_gpu.{md,json} and
bench/RESULTS.md with the device named. `--shape tiny` runs every row's commands on a tiny model (the CPU check the
test suite runs, so the script cannot rot); `--steps N` sets the optimizer steps per row.

The device image has torch, transformers, peft and accelerate; ftctl also needs `datasets` (and its `dill`,
`multiprocess`), carried as wheels with ftctl's own, and the QLoRA row bitsandbytes: `bench/gpu_wheels.sh
--with-bitsandbytes` fetches and sizes them (measured 2026-12-03: 42 MiB in all, bitsandbytes 0.50.2 41 MiB of it,
under the 64 MiB of one transfer). Without bitsandbytes the QLoRA row is skipped, saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from bench import run as perf
from bench.common import OUT, ftctl, machine, save, versions

STEPS = 20
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def varied_data(examples: int, longest: int) -> Path:
    """Alpaca-format examples of varied length (about 64 to `longest` tokens): what packing is for."""
    import random

    path = perf.PERF / "data" / f"gpu_varied_{examples}_{longest}.json"
    if not path.is_file():
        rng, words = random.Random(2), perf.gpu_words()
        rows = []
        for _ in range(examples):
            n = rng.randint(16, max(17, longest // 3))
            rows.append({"instruction": "Continue the text.", "input": " ".join(rng.choices(words, k=n)),
                         "output": " ".join(rng.choices(words, k=n))})  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    return path


def rows_for(shape: str, method: str, sequence: int, steps: int, extra: list[str], plain: bool, tag: str,
             varied: bool = False) -> list[perf.Row]:  # fmt: skip
    """ftctl (and the plain Trainer when `plain`) on one shape, method and sequence length."""
    model_dir, params = perf.gpu_model(shape)
    flops = perf.peak_bf16_flops()
    data = varied_data(steps * 4 + 2, sequence) if varied else perf.gpu_data(steps + 2)
    lora = ["--target-modules", *ALL_LINEAR, "--lora-r", "16", "--lora-alpha", "32"] if method != "full" else []
    out = perf.PERF / f"gpu-{tag}"
    batch = ["--batch-size", "4", "--micro-batch-size", "4"] if varied else ["--batch-size", "1"]
    train = [
        ftctl(), "train", "--task", "alpaca", "--method", method, "--model", str(model_dir), "--train-file", str(data),
        "--max-length", str(sequence), "--max-target-length", str(sequence), *batch, "--max-steps", str(steps),
        "--gradient-checkpointing", "--precision", "bf16", "--eval-strategy", "no", "--save-strategy", "no",
        "--num-samples", "0", "--report-to", "none", "--overwrite", *lora, *extra,
    ]  # fmt: skip

    rows = [perf.Row(f"ftctl {' '.join(extra)}".strip(), "ftctl", [*train, "--output-dir", str(out)],
                     perf.with_mfu(perf.ftctl_reader(out, "perplexity", split="metrics"), params, flops))]  # fmt: skip
    if plain:
        baseline = [
            perf.PY, "-m", "bench.baselines.plain_trainer", "--job", "sft", "--method", method, "--model",
            str(model_dir), "--train", str(data), "--samples", str(steps * (4 if varied else 1)), "--dev-samples",
            "2", "--max-steps", str(steps), "--batch-size", "4" if varied else "1", "--max-length", str(sequence),
            "--bf16", "--gradient-checkpointing", "--group-by-length", "--lr", "1e-4", "--output-dir",
            str(out) + "-plain-b", *(["--targets", *ALL_LINEAR, "--lora-r", "16", "--lora-alpha", "32"]
                                     if method != "full" else []),
        ]  # fmt: skip
        rows.append(perf.Row("plain (b): Trainer + peft, dynamic padding + group_by_length", "baseline_b", baseline,
                             perf.with_mfu(perf.baseline_reader("eval_loss"), params, flops)))  # fmt: skip
    return rows


def scenarios(shape: str | None, steps: int) -> list[perf.Scenario]:
    big, small = (shape or "8b"), (shape or "1b")
    scale = 4 if shape == "tiny" else 1  # the CPU check: the same commands on sequences 4 times shorter
    seq, long = 2048 // scale, 4096 // scale
    qlora_ready = importlib.util.find_spec("bitsandbytes") is not None

    def both(*parts: list[perf.Row]) -> list[perf.Row]:
        return [row for part in parts for row in part]

    def reference(rows: list[perf.Row]) -> list[perf.Row]:
        return [perf.Row(r.label, "reference", r.command, r.read) for r in rows]

    listed = [
        perf.Scenario(
            "8b_lora", "Llama-3-8B shape, bf16, seq 2,048, LoRA r=16 on every linear layer",
            lambda: both(rows_for(big, "lora", seq, steps, [], True, "8b-lora"),
                         reference(rows_for(big, "lora", seq, steps, ["--loss-kernel", "plain"], False,
                                            "8b-lora-plain-loss"))),
            "perplexity / eval loss", speed="real_tokens_per_second", target=(1.5, "baseline_b"),
        ),
        perf.Scenario(
            "8b_lora_4096", "Llama-3-8B shape, bf16, seq 4,096, LoRA r=16 on every linear layer (target: MFU >= 45%)",
            lambda: rows_for(big, "lora", long, steps, [], True, "8b-lora-4096"),
            "perplexity / eval loss", speed="real_tokens_per_second",
        ),
        perf.Scenario(
            "1b_lora", "Llama-3.2-1B shape, bf16, seq 2,048, LoRA r=16 on every linear layer",
            lambda: rows_for(small, "lora", seq, steps, [], True, "1b-lora"),
            "perplexity / eval loss", speed="real_tokens_per_second",
        ),
        perf.Scenario(
            "1b_full", "Llama-3.2-1B shape, bf16, seq 2,048, full fine-tuning",
            lambda: rows_for(small, "full", seq, steps, [], True, "1b-full"),
            "perplexity / eval loss", speed="real_tokens_per_second",
        ),
        perf.Scenario(
            "1b_packing", "Llama-3.2-1B shape, bf16, examples of 64 to 2,048 tokens, batches of 4: padding-free "
            "packing against padded batches",
            lambda: both(rows_for(small, "lora", seq, steps, ["--packing"], True, "1b-packing", varied=True),
                         reference(rows_for(small, "lora", seq, steps, [], False, "1b-padded", varied=True))),
            "perplexity / eval loss", speed="real_tokens_per_second",
        ),
    ]  # fmt: skip
    if qlora_ready:
        listed.insert(2, perf.Scenario(
            "8b_qlora", "Llama-3-8B shape, QLoRA 4-bit NF4 + double quantization, seq 2,048 (target: peak <= 8 GiB)",
            lambda: rows_for(big, "qlora", seq, steps, [], True, "8b-qlora"),
            "perplexity / eval loss", speed="real_tokens_per_second",
        ))  # fmt: skip
    return listed


def sync_check(shape: str | None, steps: int) -> dict[str, Any]:
    """Host syncs of a CUDA training loop, counted with torch.cuda.set_sync_debug_mode("warn") around `trainer.train`
    (the Trainer's own reads at logging steps included): one short ftctl run in this process."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: the sync count needs one (the CPU test suite counts ftctl's reads)"}
    from launch.train import main

    model_dir, _ = perf.gpu_model(shape or "1b")
    out = OUT / "perf" / "gpu-sync-check"
    argv = ["--task", "alpaca", "--method", "lora", "--model", str(model_dir), "--train-file",
            str(perf.gpu_data(steps + 2)), "--max-length", "512", "--batch-size", "1", "--max-steps", str(steps),
            "--logging-steps", str(steps), "--precision", "bf16", "--eval-strategy", "no", "--save-strategy", "no",
            "--num-samples", "0", "--report-to", "none", "--overwrite", "--output-dir", str(out)]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            main(argv)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return {"steps": steps, "logging_every": steps, "syncs": len(syncs), "per_step": len(syncs) / steps,
            "first": str(syncs[0].message)[:200] if syncs else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shape", choices=list(perf.GPU_SHAPES), help="run every row on this shape (tiny: a CPU check)"
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per row")
    parser.add_argument("--name", help="result file name (default: perf_gpu, perf_gpu_check for --shape tiny)")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", help="run these scenarios only")
    parser.add_argument("--no-history", action="store_true", help="do not add the results to bench/RESULTS.md")
    args = parser.parse_args()
    started = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    chosen = [s for s in scenarios(args.shape, args.steps) if not args.only or s.name in args.only]
    for scenario in chosen:
        perf.run_scenario(scenario)
        perf.ratios(scenario)
    syncs = sync_check(args.shape, max(4, args.steps))
    text = perf.markdown(chosen, started)
    if importlib.util.find_spec("bitsandbytes") is None:
        text += "\nQLoRA row skipped: bitsandbytes is not installed on this machine.\n"
    text += "\nHost syncs in a CUDA training loop: " + json.dumps(syncs) + "\n"
    name = args.name or ("perf_gpu_check" if args.shape == "tiny" else "perf_gpu")
    save(name, {"machine": machine(), "versions": versions(), "syncs": syncs,
                "scenarios": {s.name: s.results for s in chosen}}, text, history=not args.no_history)  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
