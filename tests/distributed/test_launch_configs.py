"""Every shipped launcher configuration, with two CPU processes: the run trains, or is refused with one line saying
why (a GPU-only setting on this CPU-only machine). A DeepSpeed stage chosen through an accelerate config is seen by
the run exactly as `--deepspeed` would be: the precision and the frozen-weight dtype follow it."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, cli, data_args, free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ACCELERATE = sorted(p.stem for p in (REPO / "accelerate_configs").glob("*.yaml"))
DEEPSPEED = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))
REFUSED = {  # on a CPU-only machine, with two processes
    "accelerate:single_gpu": "runs a single process",
    "accelerate:qlora_single_gpu": "runs a single process",
    "accelerate:multi_node": "did not all meet",
    "deepspeed:zero2_offload_optimizer": "no GPU to offload from",
    "deepspeed:zero3_offload_params_optimizer": "no GPU to offload from",
}


@pytest.mark.parametrize("config", [f"accelerate:{n}" for n in ACCELERATE] + [f"deepspeed:{n}" for n in DEEPSPEED])
def test_every_shipped_config_trains_or_is_refused_in_one_line(config, models, data, tmp_path, monkeypatch):
    monkeypatch.setenv("FTCTL_CPU_BF16", "1")  # --precision auto as users get it: bf16 on CPUs with native bf16
    kind, name = config.split(":")
    out = tmp_path / "run"
    launch = ["--accelerate-config", name] if kind == "accelerate" else ["--deepspeed", name]
    if name == "multi_node":
        launch += ["--num-machines", "2", "--machine-rank", "0", "--main-process-ip", "127.0.0.1",
                   "--rendezvous-timeout", "10"]  # fmt: skip
    launch += ["--main-process-port", str(free_port())]  # not accelerate's 29500: other workers launch meanwhile
    argv = ["ftctl", "train", *launch, "--num-processes", "2", "--task", "sst2", "--method", "lora",
            "--model", str(models["bert"]), *data_args(data), "--max-steps", "2", "--report-to", "none",
            "--eval-strategy", "no", "--save-strategy", "no", "--output-dir", str(out)]  # fmt: skip
    result = cli(*argv, timeout=900)
    if config in REFUSED:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error: ") and REFUSED[config] in lines[0], result.stderr
        assert not (out / "run.json").exists()
        return
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["launch"]["num_processes"] == 2
    if "zero" in name:
        stage = int(name.split("zero")[1][0])
        assert record["launch"]["deepspeed_stage"] == stage
        # DeepSpeed on the CPU trains in fp32, and ZeRO cannot shard frozen bf16 weights beside fp32 ones
        assert record["precision"] == "fp32" and record["frozen_params_in_autocast_dtype"] == 0
