"""`--precision auto` and bf16 on the CPU: which precision auto picks, and a real bf16 run end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_loss_fell, run_json

from launch import engine
from launch.config import resolve


def chosen(*argv: str) -> str:
    return engine.auto_precision(resolve(["--task", "sst2", *argv], prog="test").cfg)


def test_auto_precision_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("FTCTL_CPU_BF16", "1")
    for method in ("lora", "full", "llrd", "qlora", "adapter", "head", "prompt_tuning"):
        assert chosen("--method", method) == "bf16", method
    assert chosen("--method", "lora", "--deepspeed", "zero2") == "fp32"
    monkeypatch.setenv("FTCTL_CPU_BF16", "0")
    assert chosen("--method", "lora") == "fp32"
    monkeypatch.setenv("FTCTL_CPU_BF16", "1")
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is slower than fp32
    assert chosen("--method", "lora") == "fp32"


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(engine, "Path", lambda _: info)
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert engine.cpu_has_native_bf16()
    info.write_text("flags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n")
    assert engine.cpu_has_native_bf16()
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not engine.cpu_has_native_bf16()


def test_bf16_lora_run_on_cpu_trains_and_reloads(train, tmp_path):
    from launch.evaluate import main as evaluate

    run_dir = train("--precision", "bf16")
    record = run_json(run_dir)
    assert record["precision"] == "bf16" and record["config"]["precision"] == "bf16"
    assert_loss_fell(run_dir)
    scored = evaluate([str(run_dir), "--split", "validation", "--output", str(tmp_path / "eval.json")])
    assert scored["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert run_json(train(name="fp32"))["precision"] == "fp32"  # the suite's auto: fp32 (FTCTL_CPU_BF16=0)
