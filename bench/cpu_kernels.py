"""Where a small encoder's training step goes on the CPU: attention with dropout (SDPA against eager attention) and
dropout itself, forward and backward, in fp32 and bf16, at BERT-base head geometry (12 heads of 32).

    python -m bench.cpu_kernels

Each timing is the median of three batches of repetitions. Writes bench/results/cpu_kernels.{md,json} and a dated
entry in bench/RESULTS.md. Context for bench/run.py: against the plain Trainer with the same batching, what is left
to gain on the CPU sits in these operations.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import machine, machine_line, save, versions

ROUNDS = 12  # of 10 steps per setting


def timed(fn, repeats: int = 30) -> float:
    """Milliseconds per call: median of three batches of `repeats` calls, after a warm-up."""
    for _ in range(3):
        fn()
    batches = []
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        batches.append((time.perf_counter() - started) / repeats * 1e3)
    return statistics.median(batches)


def main() -> None:
    import torch
    import torch.nn.functional as F

    from launch.run.dropout import CpuDropout

    fast = CpuDropout(0.1).train()
    rows = []
    for length in (16, 64, 256):
        batch = max(4, 1024 // length)  # about 1,000 tokens per batch
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(batch, 12, length, 32, dtype=dtype, requires_grad=True)
            k = torch.randn_like(q, requires_grad=True)
            v = torch.randn_like(q, requires_grad=True)
            mask = torch.zeros(batch, 1, length, length, dtype=dtype)

            def sdpa(q=q, k=k, v=v, mask=mask) -> None:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1).sum().backward()

            def eager(q=q, k=k, v=v, mask=mask) -> None:
                scores = (q @ k.transpose(-1, -2)) * 32**-0.5 + mask
                (F.dropout(scores.softmax(-1), 0.1, True) @ v).sum().backward()

            hidden = torch.randn(batch, length, 384, dtype=dtype)
            rows.append(
                {
                    "length": length,
                    "batch": batch,
                    "dtype": str(dtype).removeprefix("torch."),
                    "sdpa_ms": timed(sdpa),
                    "eager_ms": timed(eager),
                    "dropout_ns_per_element": timed(lambda h=hidden: torch.dropout(h, 0.1, True), 100)
                    * 1e6
                    / hidden.numel(),
                    "cpu_dropout_ns_per_element": timed(lambda h=hidden: fast(h), 100) * 1e6 / hidden.numel(),
                }
            )
            print(rows[-1], flush=True)
    lines = [
        "# CPU kernels: attention with dropout (SDPA vs eager), and dropout",
        "",
        machine_line(),
        "- `python -m bench.cpu_kernels`: forward + backward of attention with dropout 0.1 (12 heads of 32, additive "
        "mask), about 1,000 tokens per batch; dropout forward on a (batch, length, 384) tensor. Median of three",
        "",
        "| length | batch | dtype | SDPA ms | eager ms | eager / SDPA time | dropout ns per element | ftctl CpuDropout "
        "ns per element |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['batch']} | {r['dtype']} | {r['sdpa_ms']:.2f} | {r['eager_ms']:.2f} | "
            f"{r['eager_ms'] / r['sdpa_ms']:.2f} | {r['dropout_ns_per_element']:.2f} | "
            f"{r['cpu_dropout_ns_per_element']:.2f} |"
        )
    steps = lora_steps()
    base = steps[0]["ms"]
    lines += [
        "",
        "## A MiniLM LoRA training step, bf16 autocast, and what ftctl changes in it",
        "",
        "all-MiniLM-L6-v2 for sequence classification, LoRA r=8 on query/value, AdamW; batch 16 x 24 tokens (an SST-2 "
        "batch); forward, backward and optimizer step; median of 120 steps per setting, run in interleaved rounds of "
        "10 after 10 warm-up steps. Each row adds one change to the row above it.",
        "",
        "| step | ms per step | speed vs stock |",
        "|---|---:|---:|",
        *[f"| {r['label']} | {r['ms']:.1f} | {base / r['ms']:.2f} |" for r in steps],
    ]
    save(
        "cpu_kernels",
        {"machine": machine(), "versions": versions(), "rows": rows, "lora_steps": steps},
        "\n".join(lines) + "\n",
    )
    print("\n".join(lines))


def lora_steps() -> list[dict]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from ftctl.models import embedded_model_dir
    from launch.run.dropout import use_cpu_dropout
    from launch.run.quiet import quiet_transformers
    from methods.base import frozen_linears_to

    quiet_transformers()

    def build(lora_dropout: float, frozen_bf16: bool, cpu_dropout: bool) -> Any:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(embedded_model_dir(), num_labels=2)
        lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=lora_dropout,
                          target_modules=["query", "value"])  # fmt: skip
        model = get_peft_model(model, lora).train()
        if frozen_bf16:
            frozen_linears_to(model, torch.bfloat16)
        if cpu_dropout:
            use_cpu_dropout(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return model, optimizer

    ids = torch.randint(1000, 20000, (16, 24))
    labels = torch.randint(0, 2, (16,))

    def steps(model: Any, optimizer: Any, n: int) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - started)
        return times

    settings = [
        ("stock: fp32 weights under autocast, torch dropout, LoRA dropout 0.1", 0.1, False, False),
        ("+ frozen linear weights stored in bf16", 0.1, True, False),
        ("+ ftctl CpuDropout", 0.1, True, True),
        ("+ no LoRA dropout (--lora-dropout 0)", 0.0, True, True),
    ]
    built = [build(*setting[1:]) for setting in settings]
    for model, optimizer in built:
        steps(model, optimizer, 10)  # warm-up
    # interleaved rounds, so that a drift of the machine's speed falls on every setting alike
    times: list[list[float]] = [[] for _ in settings]
    for _ in range(ROUNDS):
        for i, (model, optimizer) in enumerate(built):
            times[i] += steps(model, optimizer, 10)
    out = [
        {"label": setting[0], "ms": statistics.median(t) * 1e3, "steps": len(t)}
        for setting, t in zip(settings, times, strict=True)
    ]
    for row in out:
        print(row, flush=True)
    return out


if __name__ == "__main__":
    main()
