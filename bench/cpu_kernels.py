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

from bench.common import machine, save, versions


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

    rows = []
    for length in (16, 64, 256):
        batch = max(4, 1024 // length)  # about 1,000 tokens per batch
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(batch, 12, length, 32, dtype=dtype, requires_grad=True)
            k = torch.randn_like(q, requires_grad=True)
            v = torch.randn_like(q, requires_grad=True)
            mask = torch.zeros(batch, 1, length, length, dtype=dtype)

            def sdpa() -> None:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1).sum().backward()

            def eager() -> None:
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
                }
            )
            print(rows[-1], flush=True)
    lines = [
        "# CPU kernels: attention with dropout (SDPA vs eager), and dropout",
        "",
        f"- machine: {machine()}; {time.strftime('%Y-%m-%d')}; "
        + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "- `python -m bench.cpu_kernels`: forward + backward of attention with dropout 0.1 (12 heads of 32, additive "
        "mask), about 1,000 tokens per batch; dropout forward on a (batch, length, 384) tensor. Median of three",
        "",
        "| length | batch | dtype | SDPA ms | eager ms | eager / SDPA time | dropout ns per element |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']} | {r['batch']} | {r['dtype']} | {r['sdpa_ms']:.2f} | {r['eager_ms']:.2f} | "
            f"{r['eager_ms'] / r['sdpa_ms']:.2f} | {r['dropout_ns_per_element']:.2f} |"
        )
    save("cpu_kernels", {"machine": machine(), "versions": versions(), "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
