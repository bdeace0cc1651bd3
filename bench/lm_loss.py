"""Peak memory and step time of the chunked causal-LM loss (launch/run/lm_loss.py) against the model's own, on a
GPT-2-size vocabulary, on the CPU.

    python -m bench.lm_loss

A GPT-2-shaped decoder (vocabulary 50,257; 4 layers of width 256: small, so that the logits dominate as they do in
real LLM steps), random weights, fp32, batch 4 x 512 tokens of which the last 256 of each row carry labels (an
instruction-tuning layout: the prompt has none). One forward and backward per measurement, each setting in its own
fresh process (2 torch threads): peak memory is the process's peak resident set during the step minus its resident
set just before it; time is the median of 5 steps after one warm-up step. Writes bench/results/lm_loss.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from bench.common import invocation_line, machine, save, versions

VOCAB, LAYERS, WIDTH, BATCH, LENGTH, LABELLED = 50257, 4, 256, 4, 512, 256


def measure(kernel: str) -> dict:
    """Runs in the child process: one setting, measured."""
    import resource

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from launch.run import lm_loss

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=4, n_positions=LENGTH)
    model = GPT2LMHeadModel(config).train()
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH))
    labels = ids.clone()
    labels[:, : LENGTH - LABELLED] = -100
    items = torch.tensor(int((labels != -100).sum()))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        began = time.perf_counter()
        if kernel == "plain":
            loss = model(input_ids=ids, labels=labels, num_items_in_batch=items).loss
        else:
            loss = lm_loss.causal_lm_loss(model, {"input_ids": ids}, labels, items, "chunked")
        loss.backward()
        return time.perf_counter() - began

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    step()  # warm-up: allocator pools, lazy initialisation
    model.zero_grad(set_to_none=True)
    before = rss_mb()
    times = [step() for _ in range(5)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"kernel": kernel, "step_s": statistics.median(times), "peak_mb": peak, "before_mb": before}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2])))
        return
    rows = []
    for kernel in ("plain", "chunked"):
        out = subprocess.run([sys.executable, "-m", "bench.lm_loss", "--child", kernel], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-2000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain, chunked = rows
    lines = [
        "# Chunked causal-LM loss: peak memory and step time (CPU)",
        "",
        invocation_line("bench.lm_loss"),
        "",
        f"GPT-2-shaped decoder, vocabulary {VOCAB:,}, {LAYERS} layers of width {WIDTH}, random weights, fp32; "
        f"batch {BATCH} x {LENGTH} tokens, labels on the last {LABELLED} of each row; one forward + backward, each "
        "setting in its own process. The logits of the whole batch in fp32 alone are "
        f"{BATCH * LENGTH * VOCAB * 4 / 2**20:,.0f} MB.",
        "",
        "| loss | peak resident set (MB) | before the steps (MB) | step time (s, median of 5) |",
        "|---|---:|---:|---:|",
        *(f"| {r['kernel']} | {r['peak_mb']:,.0f} | {r['before_mb']:,.0f} | {r['step_s']:.3f} |" for r in rows),
        "",
        f"Peak memory {chunked['peak_mb'] / plain['peak_mb']:.2f}x the plain loss's "
        f"({plain['peak_mb'] - chunked['peak_mb']:,.0f} MB less); "
        f"step time {chunked['step_s'] / plain['step_s']:.2f}x.",
        "",
    ]
    save("lm_loss", {"rows": rows, "machine": machine(), "versions": versions()}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
