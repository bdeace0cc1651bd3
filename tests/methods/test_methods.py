"""Each method's trainable-parameter set, on every backbone family (no training: setup only)."""

from __future__ import annotations

import re

import pytest
from conftest import data_args

from ftctl.errors import FtctlError
from methods._layers import block_linear_names, embedding_modules, layer_stacks

HEADS = {"bert": ("bert.pooler", "classifier"), "gpt2": ("score",), "llama": ("score",), "t5": ("classification_head",)}


@pytest.fixture
def build(models, data, tmp_path):
    from launch.train import setup

    def run(family: str, method: str, *extra: str):
        argv = [
            "--task",
            "sst2",
            "--method",
            method,
            "--model",
            str(models[family]),
            *data_args(data, test=False),
            "--output-dir",
            str(tmp_path / "never-written"),
            *extra,
        ]
        s = setup(argv)
        assert not (tmp_path / "never-written").exists(), "setup must not write anything"
        return s.model, s.run.task

    return run


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def frozen(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("family", list(HEADS))
def test_full_trains_everything(build, family):
    model, _ = build(family, "full")
    assert not frozen(model)


@pytest.mark.parametrize("family", list(HEADS))
def test_head_trains_only_the_head(build, family):
    model, task = build(family, "head")
    heads = task.head_modules(model)
    assert set(heads) == set(HEADS[family]) or set(heads) == set(HEADS[family][:1])
    names = trainable(model)
    assert names and all(n.startswith(tuple(h + "." for h in heads)) for n in names), names
    assert len(frozen(model)) > len(names)


@pytest.mark.parametrize("family", list(HEADS))
def test_freeze_default_trains_top_block_and_head(build, family):
    model, task = build(family, "freeze")
    names = trainable(model)
    for stack_name, blocks in layer_stacks(model):
        last = len(blocks) - 1
        assert all(not p.requires_grad for p in blocks[0].parameters()), f"{stack_name}.0 should be frozen"
        assert all(p.requires_grad for p in blocks[last].parameters()), f"{stack_name}.{last} should train"
    for emb in embedding_modules(model):
        assert all(not p.requires_grad for p in model.get_submodule(emb).parameters()), emb
    for head in task.head_modules(model):
        assert any(n.startswith(head + ".") for n in names), head


def test_freeze_options(build):
    model, _ = build("bert", "freeze", "--train-last", "2", "--no-freeze-embeddings")
    assert not frozen(model)
    model, _ = build("bert", "freeze", "--freeze-layers", "2")
    stack = dict(layer_stacks(model))["bert.encoder.layer"]
    assert all(not p.requires_grad for p in stack.parameters())
    model, _ = build("t5", "freeze", "--freeze-encoder", "--freeze-layers", "0")
    assert all(not p.requires_grad for p in model.get_submodule("transformer.encoder").parameters())
    assert all(p.requires_grad for p in model.get_submodule("transformer.decoder.block").parameters())
    with pytest.raises(FtctlError, match="needs an encoder-decoder"):
        build("bert", "freeze", "--freeze-encoder")
    with pytest.raises(FtctlError, match="cannot freeze 5"):
        build("gpt2", "freeze", "--freeze-layers", "5")


LORA_TARGETS = {
    "bert": {"query", "value"},
    "gpt2": {"c_attn"},
    "t5": {"q", "v"},
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}


@pytest.mark.parametrize("family", list(LORA_TARGETS))
def test_lora_trains_adapters_and_head(build, family):
    model, task = build(family, "lora")
    names = trainable(model)
    adapted = {m.group(1) for n in names if (m := re.search(r"\.(\w+)\.lora_[AB]\.", n))}
    assert adapted == LORA_TARGETS[family]
    others = {n for n in names if ".lora_" not in n}
    assert others and all(".modules_to_save." in n for n in others), others
    assert all(".lora_" not in n for n in frozen(model))
    config = model.peft_config["default"]
    assert set(config.modules_to_save) >= set(HEADS[family][:1])


def test_lora_variants_and_options(build):
    model, _ = build("bert", "rslora", "--lora-r", "4", "--lora-alpha", "8")
    config = model.peft_config["default"]
    assert config.use_rslora and config.r == 4
    layer = model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query")
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)
    query = "base_model.model.bert.encoder.layer.0.attention.self.query"
    model, _ = build("bert", "rslora")  # default alpha 12: at r = 8 about LoRA's scale of 32/8
    assert model.get_submodule(query).scaling["default"] == pytest.approx(12 / 8**0.5)
    model, _ = build("bert", "lora")
    assert model.get_submodule(query).scaling["default"] == pytest.approx(32 / 8)
    model, _ = build("bert", "dora")
    assert any("lora_magnitude_vector" in n for n in trainable(model))
    model, _ = build("bert", "lora", "--target-modules", "all-linear")
    adapted = {m.group(1) for n in trainable(model) if (m := re.search(r"\.(\w+)\.lora_[AB]\.", n))}
    assert adapted == {"query", "key", "value", "dense"}
    with pytest.raises(FtctlError, match="not found in this bert model"):
        build("bert", "lora", "--target-modules", "q_proj")


def test_layer_discovery_finds_each_layout(models):
    from transformers import AutoModelForSequenceClassification

    expected = {
        "bert": ["bert.encoder.layer"],
        "gpt2": ["transformer.h"],
        "llama": ["model.layers"],
        "t5": ["transformer.encoder.block", "transformer.decoder.block"],
    }
    for family, stacks in expected.items():
        model = AutoModelForSequenceClassification.from_pretrained(models[family], num_labels=2, pad_token_id=0)
        assert [name for name, _ in layer_stacks(model)] == stacks
        assert embedding_modules(model), family
        assert "score" not in block_linear_names(model) and "classifier" not in block_linear_names(model)
