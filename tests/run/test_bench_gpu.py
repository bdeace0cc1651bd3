"""The GPU benchmark (bench/gpu.py) run end to end on the CPU at a tiny shape, so it cannot rot: one scenario per
code path it has (LoRA with the lean and the plain loss beside the plain Trainer, QLoRA, full fine-tuning, packing);
every row trains, is read back and lands in the results table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow  # minutes: in `make test-slow` (CI runs it too)
def test_the_gpu_benchmark_runs_at_a_tiny_shape(tmp_path):
    name = "perf_gpu_check_test"
    only = ["8b_lora", "8b_qlora", "1b_full", "1b_packing"]
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--shape", "tiny", "--steps", "1", "--name", name, "--no-history",
         "--only", *only],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        payload = json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())
        assert set(payload["scenarios"]) == set(only)
        for scenario, rows in payload["scenarios"].items():
            kinds = {r["kind"] for r in rows}
            assert "ftctl" in kinds and "baseline_b" in kinds, scenario
            for row in rows:
                assert row["real_tokens_per_second"] > 0 and row["mfu"] > 0 and row["peak_memory_mb"] > 0, row
        assert {r["kind"] for r in payload["scenarios"]["8b_lora"]} == {"ftctl", "baseline_b", "reference"}
        assert "skipped" in payload["syncs"]  # no CUDA here: said so, not measured
    finally:  # the check's result files are not the benchmark's record
        for suffix in ("json", "md"):
            (REPO / "bench" / "results" / f"{name}.{suffix}").unlink(missing_ok=True)
