"""Bottleneck adapters (methods/_bottleneck.py): where they go in each layout, that they start as the identity,
train alone, survive gradient checkpointing, and save and reload adapter-only to exactly the same outputs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import data_args

from ftctl.errors import FtctlError
from methods._bottleneck import CONFIG, WEIGHTS, BottleneckAdapter, adapter_names, adapter_sites, inject, load_adapter


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread per test process: with `-n 2` on two cores, two threads each oversubscribe the CPU and
    make these many small runs several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SITES = {  # block 0 of each stack; houlsby = attention output(s) + feed-forward output
    "bert": ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"],
    "gpt2": ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"],
    "llama": ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"],
    "t5": [
        "transformer.encoder.block.0.layer.0.SelfAttention.o",
        "transformer.encoder.block.0.layer.1.DenseReluDense.wo",
        "transformer.decoder.block.0.layer.0.SelfAttention.o",
        "transformer.decoder.block.0.layer.1.EncDecAttention.o",
        "transformer.decoder.block.0.layer.2.DenseReluDense.wo",
    ],
}


def classifier(models, family: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(models[family], num_labels=2, pad_token_id=0)
    return model.eval()


def batch(models, family: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models[family])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return dict(tokenizer(["a good film", "the plot was awful and dull"], padding=True, return_tensors="pt"))


def block_zero(sites: list[str]) -> list[str]:
    return [s for s in sites if re.search(r"\.(\d+)\.", s).group(1) == "0"]  # the block index comes first


@pytest.mark.parametrize("family", list(SITES))
def test_sites_follow_attention_and_feed_forward_outputs(models, family):
    model = classifier(models, family)
    houlsby, pfeiffer = adapter_sites(model, "houlsby"), adapter_sites(model, "pfeiffer")
    assert block_zero(houlsby) == SITES[family]
    ffn = [s for s in SITES[family] if s.endswith((".0.output.dense", "mlp.c_proj", "down_proj", "wo"))]
    assert block_zero(pfeiffer) == ffn
    assert len(houlsby) == len(SITES[family]) * 2  # two blocks per stack in the tiny models


@pytest.mark.parametrize("family", list(SITES))
def test_adapters_start_as_the_identity_and_only_they_learn(models, family):
    model = classifier(models, family)
    inputs = batch(models, family)
    with torch.no_grad():
        expected = model(**inputs).logits
    sites = adapter_sites(model, "houlsby")
    inject(model, sites, size=4, non_linearity="gelu")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    names = adapter_names(model)
    assert len(names) == len(sites) and all(n.endswith(".adapter") for n in names)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        model.get_submodule(name).requires_grad_(True)
    model.train()
    model(**inputs, labels=torch.tensor([1, 0])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".adapter." in n for n in with_grad)
    assert all(model.get_submodule(n).up.weight.grad.abs().sum() > 0 for n in names)


def test_adapter_parameters_and_non_linearities():
    for non_linearity in ("relu", "gelu", "silu", "tanh"):
        adapter = BottleneckAdapter(16, 4, non_linearity)
        assert sum(p.numel() for p in adapter.parameters()) == 2 * 16 * 4 + 16 + 4
        hidden = torch.randn(2, 3, 16)
        assert torch.equal(adapter(hidden), hidden)  # up-projection starts at zero
        torch.nn.init.normal_(adapter.up.weight)
        assert not torch.equal(adapter(hidden), hidden)


def test_gradient_checkpointing_gives_the_same_adapter_gradients(models):
    grads = []
    for checkpointing in (False, True):
        model = classifier(models, "llama")
        inject(model, adapter_sites(model, "houlsby"), size=4, non_linearity="relu")
        for name in adapter_names(model):
            torch.nn.init.normal_(model.get_submodule(name).up.weight, std=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(**batch(models, "llama"), labels=torch.tensor([1, 0])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if ".adapter." in n})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_save_and_reload_reproduce_outputs_exactly(models, tmp_path, family):
    from methods._bottleneck import save_adapter

    model = classifier(models, family)
    sites = adapter_sites(model, "pfeiffer")
    inject(model, sites, size=4, non_linearity="silu")
    torch.manual_seed(1)
    for name in adapter_names(model):
        for p in model.get_submodule(name).parameters():
            torch.nn.init.normal_(p, std=0.2)  # stand-in for training
    head = "score" if family == "gpt2" else "classification_head"
    config = {"style": "pfeiffer", "size": 4, "non_linearity": "silu", "sites": sites, "modules_to_save": [head]}
    save_adapter(model.state_dict(), adapter_names(model) + [head], config, str(tmp_path))
    inputs = batch(models, family)
    with torch.no_grad():
        expected = model(**inputs).logits

    from safetensors import safe_open

    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(".adapter." in k or k.startswith(head + ".") for k in keys), "adapter and head only"

    fresh = classifier(models, family)  # a different random head: the saved one must replace it
    torch.manual_seed(123)
    torch.nn.init.normal_(
        fresh.get_submodule(head).weight if family == "gpt2" else fresh.classification_head.out_proj.weight
    )
    reloaded = load_adapter(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)


def test_load_refuses_other_files_and_other_bases(models, tmp_path):
    from methods._bottleneck import save_adapter

    bert = classifier(models, "bert")
    sites = adapter_sites(bert, "houlsby")
    inject(bert, sites, size=4, non_linearity="relu")
    config = {"style": "houlsby", "size": 4, "non_linearity": "relu", "sites": sites, "modules_to_save": []}
    save_adapter(bert.state_dict(), adapter_names(bert), config, str(tmp_path / "bert"))
    with pytest.raises(AttributeError):  # the sites do not exist in a GPT-2
        load_adapter(classifier(models, "gpt2"), tmp_path / "bert")
    (tmp_path / "bert" / CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FtctlError, match="does not describe ftctl bottleneck adapters"):
        load_adapter(classifier(models, "bert"), tmp_path / "bert")


def test_adapter_options(models, data, tmp_path):
    from launch.train import setup

    base = ["--task", "sst2", "--method", "adapter", "--model", str(models["bert"]), *data_args(data, test=False)]
    out = ["--output-dir", str(tmp_path / "never")]
    s = setup([*base, "--adapter-style", "pfeiffer", "--adapter-size", "6", "--adapter-non-linearity", "tanh", *out])
    names = adapter_names(s.model)
    assert names == ["bert.encoder.layer.0.output.dense.adapter", "bert.encoder.layer.1.output.dense.adapter"]
    adapter = s.model.get_submodule(names[0])
    assert adapter.down.out_features == 6 and isinstance(adapter.act, torch.nn.Tanh)
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or n.startswith(("classifier.", "bert.pooler.")) for n in trainable)
    with pytest.raises(FtctlError, match="--adapter-size must be at least 1"):
        setup([*base, "--adapter-size", "0", *out])
    with pytest.raises(FtctlError, match="--adapter-style"):
        setup([*base, "--adapter-style", "parallel", *out])
