"""The CLI end to end on a CUDA device, the way a user runs it: `python -m bench.gpu_smoke` (about 2 minutes on one
H100/H200; runs on a CPU too, as a check).

On a tiny Llama-3-layout instruct decoder (random weights, its real chat template: tests/chat_models.py), each step
a separate `ftctl` process:

- `train_t2t` / `evaluate_t2t`: classification by generation (`sst2_t2t`), LoRA, bf16, then `ftctl evaluate
  --baseline` (zero-shot generation beside the fine-tuned model);
- `train_qlora` / `evaluate_qlora`: a classification head on the decoder, QLoRA 4-bit (bitsandbytes' CUDA kernels);
- `grid_jobs2`: `ftctl grid --jobs 2`, two small cells (LoRA and full) that share the one GPU by predicted memory;
- `host_syncs`: the host syncs of the training loop (bench/gpu.py's sync_check at the tiny Llama shape; CUDA only).

Every step's exit code, wall time and the numbers it wrote (run.json / eval.json / grid.json) go to
bench/results/gpu_smoke.json; logs to bench/out/gpu-smoke/logs. A failed step does not stop the others.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench import gpu as gpu_bench
from bench.common import OUT, REPO, RESULTS, attempt, ftctl, machine, versions

HERE = OUT / "gpu-smoke"
DEMO = REPO / "tasks" / "data" / "demo_sentiment"
STEPS = ["--max-steps", "12", "--batch-size", "8", "--learning-rate", "5e-3", "--report-to", "none",
         "--eval-strategy", "no", "--save-strategy", "no", "--overwrite"]  # fmt: skip
DATA = ["--train-file", str(DEMO / "train.jsonl"), "--validation-file", str(DEMO / "validation.jsonl"),
        "--test-file", str(DEMO / "test.jsonl"), "--max-train-samples", "96", "--max-eval-samples", "32"]  # fmt: skip


def tiny_llama3() -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    import chat_models

    folder = HERE / "llama3"
    return folder if (folder / "config.json").is_file() else chat_models.save_chat_model("llama3", folder)


def step(name: str, command: list[str], timeout: float, read: Path | None = None) -> dict[str, Any]:
    log = HERE / "logs" / f"{name}.log"
    wall, code = attempt(command, log, timeout)
    out: dict[str, Any] = {"exit": code, "wall_s": round(wall, 1), "command": " ".join(command)}
    if code:
        out["log_tail"] = log.read_text(errors="replace").strip().splitlines()[-15:]
    elif read is not None and read.is_file():
        out["wrote"] = json.loads(read.read_text())
    print(f"{name}: exit {code} ({wall:.0f} s)", flush=True)
    return out


def grid_spec(model: Path) -> Path:
    spec = {
        "name": "gpu smoke: two cells on one GPU",
        "output_dir": str(HERE / "grid"),
        "models": {"llama3": str(model)},
        "tasks": {"sst2": {"train_file": str(DEMO / "train.jsonl"), "validation_file": str(DEMO / "validation.jsonl"),
                           "test_file": str(DEMO / "test.jsonl"), "max_train_samples": 96, "max_eval_samples": 32}},
        "methods": ["lora", "full"],
        "settings": {"max_steps": 12, "batch_size": 8, "learning_rate": 5e-3, "report_to": "none",
                     "precision": "bf16"},
    }  # fmt: skip
    path = HERE / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def grid_summary(folder: Path) -> dict[str, Any]:
    """The executor, and each cell's state, where it ran, its predicted and measured memory and its time."""
    state = json.loads((folder / "grid.json").read_text()) if (folder / "grid.json").is_file() else {}
    keep = ("id", "status", "error", "attempts", "where", "predicted_memory_mb", "seconds", "summary")
    return {"status": state.get("status"), "executor": state.get("executor"),
            "cells": [{k: cell.get(k) for k in keep} for cell in state.get("cells", [])]}  # fmt: skip


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.time()
    model = tiny_llama3()
    cli, t2t, qlora = ftctl(), HERE / "t2t", HERE / "qlora"
    model_args = ["--model", str(model), "--precision", "bf16"]
    steps = {
        "train_t2t": step(
            "train_t2t",
            [
                cli,
                "train",
                "--task",
                "sst2_t2t",
                "--method",
                "lora",
                *model_args,
                *DATA,
                "--max-new-tokens",
                "3",
                *STEPS,
                "--output-dir",
                str(t2t),
            ],
            240,
            t2t / "run.json",
        ),  # fmt: skip
    }
    steps["evaluate_t2t"] = step("evaluate_t2t", [cli, "evaluate", str(t2t), "--baseline"], 180, t2t / "eval.json")
    qlora_train = [cli, "train", "--task", "sst2", "--method", "qlora", *model_args, *DATA, *STEPS, "--output-dir"]
    steps["train_qlora"] = step("train_qlora", [*qlora_train, str(qlora)], 240, qlora / "run.json")
    steps["evaluate_qlora"] = step("evaluate_qlora", [cli, "evaluate", str(qlora)], 120, qlora / "eval.json")
    grid = step("grid_jobs2", [cli, "grid", str(grid_spec(model)), "--jobs", "2"], 300)
    grid["summary"] = grid_summary(HERE / "grid")
    steps["grid_jobs2"] = grid
    try:  # in this process: the Trainer's loop watched by torch.cuda.set_sync_debug_mode (bench/gpu.py)
        steps["host_syncs"] = {"exit": 0, **gpu_bench.sync_check("tiny", 8)}
    except Exception as exc:  # noqa: BLE001 - reported with the other steps
        steps["host_syncs"] = {"exit": 1, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    payload = {"machine": machine(), "versions": versions(), "minutes": (time.time() - started) / 60, "steps": steps}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_smoke.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    failed = [name for name, s in steps.items() if s["exit"]]
    print(f"gpu smoke: {len(steps) - len(failed)} of {len(steps)} steps passed", f"; failed: {failed}" * bool(failed))


if __name__ == "__main__":
    main()
