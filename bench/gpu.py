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
from bench.common import OUT, ftctl, machine, machine_line, save, versions

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
    """Host syncs of a CUDA training loop: one short ftctl run in this process with torch.cuda.set_sync_debug_mode
    ("warn") over the Trainer's training loop only (not loading, planning or saving). Each sync is kept with where it
    was made (the Python line that asked) and the optimizer step it fell in; `steady_per_step` counts those inside
    steps 2..N (step 1 builds the optimizer state), so 0 means set_sync_debug_mode("error") over those steps passes.
    Logging every `steps` steps: the Trainer's loss read falls once, between the last steps."""
    import collections
    import warnings

    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: the sync count needs one (the CPU test suite counts ftctl's reads)"}
    from transformers import TrainerCallback

    from launch.run.trainer import FtctlTrainer
    from launch.train import main

    step: dict[str, int | None] = {"now": None}
    seen: list[tuple[int | None, str]] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step["now"] = state.global_step + 1

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step["now"] = None

    def hook(message: Any, category: Any, filename: str, lineno: int, *rest: Any, **kw: Any) -> None:
        if "synchroniz" in str(message):
            seen.append((step["now"], f"{filename.rsplit('site-packages/', 1)[-1]}:{lineno}"))

    original = FtctlTrainer._inner_training_loop

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.add_callback(Steps())
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = hook
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    model_dir, _ = perf.gpu_model(shape or "1b")
    out = OUT / "perf" / "gpu-sync-check"
    argv = ["--task", "alpaca", "--method", "lora", "--model", str(model_dir), "--train-file",
            str(perf.gpu_data(steps + 2)), "--max-length", "512", "--batch-size", "1", "--max-steps", str(steps),
            "--logging-steps", str(steps), "--precision", "bf16", "--eval-strategy", "no", "--save-strategy", "no",
            "--num-samples", "0", "--report-to", "none", "--overwrite", "--output-dir", str(out)]  # fmt: skip
    FtctlTrainer._inner_training_loop = counted  # type: ignore[method-assign]
    try:
        main(argv)
    finally:
        FtctlTrainer._inner_training_loop = original  # type: ignore[method-assign]
    steady = [where for at, where in seen if at is not None and at > 1]
    return {
        "steps": steps, "logging_every": steps, "syncs": len(seen),
        "in_step_1": sum(at == 1 for at, _ in seen), "between_steps": sum(at is None for at, _ in seen),
        "steady_per_step": len(steady) / max(1, steps - 1),
        "where": dict(collections.Counter(where for _, where in seen).most_common(8)),
    }  # fmt: skip


def gpu_markdown(chosen: list[perf.Scenario], started: float, steps: int, skipped: list[str]) -> str:
    """The GPU result page: per row tokens/s, MFU, peak CUDA memory, the plan's prediction for it, and the ratios to
    the plain Trainer (b) measured in the same run."""
    fmt = perf.fmt
    lines = [
        "# GPU performance: ftctl vs plain transformers + peft, same device, same invocation",
        "",
        machine_line(),
        f"- `python -m bench.gpu --steps {steps}` ({(time.time() - started) / 60:.1f} minutes); random-weight Llama "
        "shapes, bf16, micro-batch 1 unless said, gradient checkpointing; each row its own process",
        "- tokens/s: real (non-pad) tokens over the training time (Trainer's train_runtime, start-up and loading "
        "excluded); MFU: 6 x parameters x tokens/s over the bf16 matmul rate measured on this device (LoRA/QLoRA "
        "skip the frozen weights' gradients: bounded near 4/6); peak: torch.cuda.max_memory_allocated of the run's "
        "process; plan: `ftctl plan`'s prediction recorded in run.json before any weight was read, and measured / "
        "predicted - 1",
        "",
    ]
    for s in chosen:
        lines += [f"## {s.name}: {s.description}", "",
                  "| row | real tokens/s | MFU | peak GiB | plan GiB | plan error | vs (b) tokens/s | peak vs (b) | "
                  "train s | process s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        base = next((r for r in s.results if r["kind"] == "baseline_b" and "failed" not in r), {})
        for r in s.results:
            if "failed" in r:
                lines.append(f"| {r['label']} | FAILED ({r['failed']}) |{' |' * 7} {fmt(r['process_wall_s'], 0)} |")
                continue
            peak, plan = r.get("peak_memory_mb"), r.get("plan_peak_memory_mb")
            memory = peak / base["peak_memory_mb"] if peak and base.get("peak_memory_mb") and r is not base else None
            r["peak_vs_baseline_b"] = memory
            error = r.get("plan_memory_error")
            lines.append(
                f"| {r['label']} | {fmt(r.get('real_tokens_per_second'), 0)} | {fmt(100 * r.get('mfu', 0), 1)}% "
                f"| {fmt(peak and peak / 1024, 2)} | {fmt(plan and plan / 1024, 2)} | "
                f"{'-' if error is None else f'{100 * error:+.1f}%'} | {fmt(r.get('ratio_vs_baseline_b'), 2)} | "
                f"{fmt(memory, 2)} | {fmt(r.get('train_runtime_s'), 1)} | {fmt(r['process_wall_s'], 0)} |"
            )
        lines += [""] + [line for r in s.results for line in _verdicts(s, r)]
        failed = [r for r in s.results if "failed" in r]
        for r in failed:
            lines += ["", f"{r['label']} failed; its log ends:", "", "```", *r["log_tail"], "```"]
        lines += ["", "Commands:", ""] + [f"- {r['label']}: `{r['command']}`" for r in s.results] + [""]
    if skipped:
        lines += [f"Not run (the --budget-s ran out first): {', '.join(skipped)}.", ""]
    return "\n".join(lines)


def _verdicts(s: perf.Scenario, r: dict[str, Any]) -> list[str]:
    """The issue's targets, each said as met or not for the ftctl row it is about."""
    if r["kind"] != "ftctl" or "failed" in r:
        return []
    out = []
    if s.name == "8b_lora":
        ratio, memory = r.get("ratio_vs_baseline_b"), r.get("peak_vs_baseline_b")
        met = ratio is not None and ratio >= 1.5 and memory is not None and memory <= 1.0
        out.append(f"- Target >= 1.5x plain (b) tokens/s at no more peak memory: {perf.fmt(ratio, 2)}x tokens/s, "
                   f"{perf.fmt(memory, 2)}x peak memory, {'met' if met else 'NOT met'}.")  # fmt: skip
    if s.name == "8b_lora_4096":
        mfu = r.get("mfu", 0)
        out.append(f"- Target MFU >= 45%: {100 * mfu:.1f}%, {'met' if mfu >= 0.45 else 'NOT met'}.")
    if s.name == "8b_qlora":
        gib = (r.get("peak_memory_mb") or 0) / 1024
        out.append(f"- Target peak <= 8 GiB: {gib:.2f} GiB, {'met' if 0 < gib <= 8 else 'NOT met'}.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shape", choices=list(perf.GPU_SHAPES), help="run every row on this shape (tiny: a CPU check)"
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per row")
    parser.add_argument("--name", help="result file name (default: perf_gpu, perf_gpu_check for --shape tiny)")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", help="run these scenarios only")
    parser.add_argument("--no-history", action="store_true", help="do not add the results to bench/RESULTS.md")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="a failed row is reported (exit code, log tail) and the others still run (a device lease)",
    )
    parser.add_argument("--row-timeout", type=float, help="seconds one row's process may take (with --keep-going)")
    parser.add_argument(
        "--no-sync-check",
        action="store_true",
        help="skip the host-sync count (bench/gpu_smoke.py runs it on a tiny model)",
    )
    parser.add_argument(
        "--budget-s", type=float, help="start no scenario after this many seconds; the ones left are listed as not run"
    )
    args = parser.parse_args()
    started = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    chosen = [s for s in scenarios(args.shape, args.steps) if not args.only or s.name in args.only]
    name = args.name or ("perf_gpu_check" if args.shape == "tiny" else "perf_gpu")
    ran: list[perf.Scenario] = []
    skipped: list[str] = []

    def write(syncs: dict[str, Any], history: bool) -> str:
        text = gpu_markdown(ran, started, args.steps, skipped)
        if importlib.util.find_spec("bitsandbytes") is None:
            text += "\nQLoRA row skipped: bitsandbytes is not installed on this machine.\n"
        text += "\nHost syncs in a CUDA training loop: " + json.dumps(syncs) + "\n"
        save(name, {"machine": machine(), "versions": versions(), "syncs": syncs, "skipped": skipped,
                    "scenarios": {s.name: s.results for s in ran}}, text, history=history)  # fmt: skip
        return text

    for scenario in chosen:
        if args.budget_s is not None and time.time() - started > args.budget_s:
            skipped.append(scenario.name)
            continue
        perf.run_scenario(scenario, keep_going=args.keep_going, timeout=args.row_timeout)
        perf.ratios(scenario)
        ran.append(scenario)
        write({"pending": "the sync count runs after the scenarios"}, history=False)  # a lease may end first
    syncs = {"skipped": "--no-sync-check"} if args.no_sync_check else sync_check(args.shape, max(4, args.steps))
    print(write(syncs, history=not args.no_history))


if __name__ == "__main__":
    main()
