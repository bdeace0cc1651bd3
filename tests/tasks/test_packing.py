"""Padding-free packing (`--packing`) for decoders: a packed batch gives the loss of the padded batch, examples in
one packed row never see each other, and a packed run trains end to end with no padding computed."""

from __future__ import annotations

import pytest
import task_data
import torch
from conftest import run_json

from ftctl.errors import FtctlError
from tasks._generation import GenerationCollator, PackingCollator


def features(tokenizer, seed: int, n: int = 5) -> list[dict]:
    """Decoder examples of different lengths, prompt masked out of the labels as the tasks encode them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(5, tokenizer.vocab_size, (3 + 2 * i,), generator=g).tolist()
        target = torch.randint(5, tokenizer.vocab_size, (2 + i % 3,), generator=g).tolist()
        ids = prompt + target + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + target + [tokenizer.eos_token_id]})
    return rows


def causal_lm(models, family: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models[family])
    model = AutoModelForCausalLM.from_pretrained(models[family], attn_implementation="sdpa").eval()
    return model, tokenizer


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_loss_equals_padded_loss(models, family):
    model, tokenizer = causal_lm(models, family)
    rows = features(tokenizer, seed=1)
    padded = GenerationCollator(tokenizer.pad_token_id or tokenizer.eos_token_id)(rows)
    padded.pop("generation_input_ids", None)
    packed = PackingCollator()(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert "attention_mask" not in packed
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
    # float32 sums of the same per-token losses in a different order
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5, abs=1e-6)

    # and the loss must be able to differ: without restarting positions the rows would run together
    run_on = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).unsqueeze(0)}
    with torch.no_grad():
        assert abs(model(**run_on).loss.item() - loss_padded.item()) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_examples_do_not_see_each_other(models, family):
    """Changing the first example changes none of the other examples' logits in the packed row."""
    model, tokenizer = causal_lm(models, family)
    rows = features(tokenizer, seed=2)
    changed = [dict(r) for r in rows]
    changed[0] = {**rows[0], "input_ids": [t + 1 for t in rows[0]["input_ids"]]}
    first = len(rows[0]["input_ids"])
    with torch.no_grad():
        a = model(**{k: v for k, v in PackingCollator()(rows).items() if k != "labels"}).logits[0, first:]
        b = model(**{k: v for k, v in PackingCollator()(changed).items() if k != "labels"}).logits[0, first:]
        whole = model(**{k: v for k, v in PackingCollator()(changed).items() if k != "labels"}).logits[0, :first]
        base = model(**{k: v for k, v in PackingCollator()(rows).items() if k != "labels"}).logits[0, :first]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole, base)  # the change itself is visible where it was made


def test_packed_run_trains_and_computes_no_padding(models, tmp_path):
    from launch.train import main

    d = tmp_path / "data"
    d.mkdir()
    train = task_data.prompt_completions(d / "train.jsonl", 40, 1)
    validation = task_data.prompt_completions(d / "validation.jsonl", 8, 2)
    common = [
        "--task", "instruction", "--method", "lora", "--model", str(models["gpt2"]),
        "--train-file", str(train), "--validation-file", str(validation), "--epochs", "3", "--batch-size", "8",
        "--learning-rate", "5e-3", "--report-to", "none", "--eval-on-start", "--max-length", "96",
        "--max-new-tokens", "4", "--num-samples", "1",
    ]  # fmt: skip
    main([*common, "--packing", "--output-dir", str(tmp_path / "packed")])
    main([*common, "--output-dir", str(tmp_path / "padded")])
    packed, padded = run_json(tmp_path / "packed"), run_json(tmp_path / "padded")
    losses = [h["eval_loss"] for h in packed["history"] if "eval_loss" in h]
    assert losses[-1] < losses[0], losses
    assert packed["padding_fraction"] == 0 and packed["train_token_slots"] == packed["train_real_tokens"] > 0
    assert padded["padding_fraction"] > 0
    # the same examples were trained on: the same real tokens, fewer slots computed
    assert packed["train_real_tokens"] == padded["train_real_tokens"]
    assert packed["train_token_slots"] < padded["train_token_slots"]


def test_packing_refusals(models, tmp_path):
    from launch.train import setup

    d = tmp_path / "data"
    d.mkdir()
    train = task_data.prompt_completions(d / "train.jsonl", 12, 1)
    base = ["--task", "instruction", "--train-file", str(train), "--packing", "--output-dir", str(tmp_path / "x")]
    with pytest.raises(FtctlError, match="--packing concatenates examples in one decoder sequence"):
        setup([*base, "--method", "lora", "--model", str(models["t5"])])
    with pytest.raises(FtctlError, match="prompt_tuning adds virtual tokens .* drop --packing"):
        setup([*base, "--method", "prompt_tuning", "--model", str(models["gpt2"])])
    assert not (tmp_path / "x").exists()


def test_packing_takes_variable_length_attention_on_cuda_with_flash_attn(models, monkeypatch):
    """On a CUDA GPU with flash-attn, packed training loads FlashAttention-2 (variable-length kernels, no mask, no
    padding); anywhere else the default attention with its block-diagonal mask (compared with padding above)."""
    import importlib.util

    from ftctl import device
    from launch.run.config import resolve_values
    from tasks import _generation as generation

    real_find = importlib.util.find_spec
    monkeypatch.setattr(device, "cuda_bf16", lambda: True)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find(name)
    )
    assert generation.varlen_attention() == "flash_attention_2"
    task = resolve_values({"task": "instruction", "model": str(models["llama"]), "packing": True}).task
    task = task.bind(fit=task.check_model(__import__("transformers").AutoConfig.from_pretrained(models["llama"]),
                                          generation.Family.DECODER))  # fmt: skip
    seen = {}
    monkeypatch.setattr(type(task), "load_pretrained", lambda self, auto, ref, **kw: seen.update(kw) or _Stub())
    task.build_model(str(models["llama"]), _Stub(), {})
    assert seen["attn_implementation"] == "flash_attention_2"
    monkeypatch.setattr(device, "cuda_bf16", lambda: None)  # no GPU: the default attention
    assert generation.varlen_attention() is None
    monkeypatch.setattr(device, "cuda_bf16", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find(name))
    assert generation.varlen_attention() is None  # a GPU without flash-attn


class _Stub:
    """Stands in for a loaded model and a tokenizer in the attention check (no weights needed)."""

    pad_token_id = 0

    def __init__(self):
        self.config = type("Config", (), {"pad_token_id": 0})()
        self.generation_config = type("GenerationConfig", (), {"pad_token_id": 0})()
