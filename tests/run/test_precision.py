"""`--precision auto` and bf16 on the CPU: which precision auto picks, and a real bf16 run end to end."""

from __future__ import annotations

import pytest
import tiny
import torch
from conftest import assert_loss_fell, run_json

from launch.run import precision
from launch.run.config import resolve
from launch.run.precision import auto_precision, cpu_has_native_bf16, precision_flags


def chosen(*argv: str) -> str:
    return auto_precision(resolve(["--task", "sst2", *argv], prog="test").cfg)


def test_auto_precision_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("FTCTL_CPU_BF16", "1")
    for method in ("lora", "full", "llrd", "qlora", "adapter", "head", "prompt_tuning"):
        assert chosen("--method", method) == "bf16", method
    assert chosen("--method", "lora", "--deepspeed", "zero2") == "fp32"
    monkeypatch.setenv("FTCTL_CPU_BF16", "0")
    assert chosen("--method", "lora") == "fp32"
    monkeypatch.setenv("FTCTL_CPU_BF16", "1")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is slower than fp32
    assert chosen("--method", "lora") == "fp32"


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "Path", lambda _: info)
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16()
    info.write_text("flags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n")
    assert cpu_has_native_bf16()
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not cpu_has_native_bf16()


def test_bf16_lora_run_on_cpu_trains_and_reloads(train, tmp_path):
    from launch.evaluate import main as evaluate

    run_dir = train("--precision", "bf16")
    record = run_json(run_dir)
    assert record["precision"] == "bf16" and record["config"]["precision"] == "bf16"
    assert record["frozen_params_in_autocast_dtype"] > 0  # LoRA's frozen projections, stored in bf16
    assert_loss_fell(run_dir)
    scored = evaluate([str(run_dir), "--split", "validation", "--output", str(tmp_path / "eval.json")])
    assert scored["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert run_json(train(name="fp32"))["precision"] == "fp32"  # the suite's auto: fp32 (FTCTL_CPU_BF16=0)


def _lora_bert(dropout: float):
    import transformers as t
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = t.BertForSequenceClassification(tiny.bert_config(100, num_labels=2))
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["query", "value"])
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():  # LoRA's B starts at zero; give the update a value to compare
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _step(model, seed: int):
    torch.manual_seed(seed)
    ids = torch.randint(1, 100, (4, 12))
    labels = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(seed + 1)  # the same dropout masks in both models
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_frozen_linears_in_bf16_change_no_autocast_result():
    from methods.base import frozen_linears_to

    reference, converted = _lora_bert(0.1), _lora_bert(0.1)
    n = frozen_linears_to(converted, torch.bfloat16)
    base = converted.base_model.model.bert.encoder.layer[0]
    assert base.attention.self.query.base_layer.weight.dtype == torch.bfloat16
    assert base.intermediate.dense.weight.dtype == torch.bfloat16
    assert n == sum(p.numel() for name, p in converted.named_parameters() if p.dtype == torch.bfloat16)
    # what is trained stays fp32: the LoRA matrices and the classifier head
    assert all(p.dtype == torch.float32 for p in converted.parameters() if p.requires_grad)
    for seed in (0, 1):
        loss_a, grads_a = _step(reference, seed)
        loss_b, grads_b = _step(converted, seed)
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name


def test_tied_and_trained_weights_stay_fp32():
    import transformers as t
    from peft import LoraConfig, get_peft_model

    from methods.base import frozen_linears_to

    config = t.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=32, tie_word_embeddings=True)
    model = get_peft_model(t.GPT2LMHeadModel(config), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]))
    frozen_linears_to(model, torch.bfloat16)
    inner = model.base_model.model
    assert inner.lm_head.weight is inner.transformer.wte.weight and inner.lm_head.weight.dtype == torch.float32
    block = inner.transformer.h[0]
    assert block.attn.c_attn.base_layer.weight.dtype == torch.bfloat16  # GPT-2's Conv1D
    assert block.mlp.c_fc.weight.dtype == torch.bfloat16
    assert block.attn.c_attn.lora_A["default"].weight.dtype == torch.float32


def test_which_methods_store_frozen_weights_in_bf16():
    from methods import METHODS

    def flag(name: str) -> bool:
        return METHODS.get(name).create({}).frozen_weights_in_autocast_dtype

    for name in ("lora", "rslora", "adalora", "ia3", "adapter", "prompt_tuning", "prefix_tuning"):
        assert flag(name), name
    # DoRA normalizes base + update outside autocast; full-model methods save the frozen weights they hold
    for name in ("dora", "full", "freeze", "head", "llrd"):
        assert not flag(name), name


@pytest.mark.parametrize(
    "bf16,model_type,expected",
    [(True, "llama", "bf16"), (False, "llama", "fp16"), (False, "bert", "fp16"), (False, "t5", "fp32")],
)
def test_auto_precision_on_gpus_with_and_without_bf16(monkeypatch, bf16, model_type, expected):
    """The GPU's bf16 support is read in one place (ftctl.device.cuda_bf16), replaced here by a stand-in GPU: auto is
    bf16 where it exists, else fp16 with loss scaling, except on T5-family models (fp16 overflows there)."""
    from ftctl import device
    from ftctl.facts import LaunchFacts

    monkeypatch.setattr(device, "cuda_bf16", lambda: bf16)
    assert auto_precision(LaunchFacts(), model_type) == expected
    cfg = resolve(["--task", "sst2"], prog="test").cfg
    flags = precision_flags(cfg, LaunchFacts(), model_type)
    assert flags == {"bf16": expected == "bf16", "fp16": expected == "fp16"}


def test_qlora_computes_in_the_precision_the_gpu_has(monkeypatch):
    import torch as torch_

    from ftctl import device
    from methods import _qlora as qlora

    monkeypatch.setattr(device, "cuda_bf16", lambda: False)
    assert qlora.compute_dtype() == torch_.float16
    monkeypatch.setattr(device, "cuda_bf16", lambda: True)
    assert qlora.compute_dtype() == torch_.bfloat16


def test_bf16_on_a_gpu_without_it_and_fp16_on_t5_are_refused(monkeypatch, models):
    from transformers import AutoConfig

    from ftctl import device
    from ftctl.errors import FtctlError
    from ftctl.facts import LaunchFacts
    from ftctl.models import check_precision

    monkeypatch.setattr(device, "cuda_bf16", lambda: False)
    cfg = resolve(["--task", "sst2", "--precision", "bf16"], prog="test").cfg
    with pytest.raises(FtctlError, match="this GPU does not support bf16; use --precision fp16"):
        precision_flags(cfg, LaunchFacts())
    fp16 = resolve(["--task", "sst2", "--precision", "fp16"], prog="test").cfg
    with pytest.raises(FtctlError, match="use --precision fp32, or bf16 on a GPU that has it"):
        check_precision(fp16, AutoConfig.from_pretrained(models["t5"]))
