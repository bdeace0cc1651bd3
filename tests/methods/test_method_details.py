"""Method details beyond the matrix: layer-wise decay groups, AdaLoRA's rank reallocation, what QLoRA quantizes, the
soft-prompt variants and IA3's targets, and their option checks."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import data_args

from ftctl.errors import FtctlError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread per test process (see test_method_matrix.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def build(models, data, tmp_path):
    """`launch.train.setup` on a tiny model: the model ready to train, nothing written."""
    from launch.train import setup

    def run(family: str, method: str, *extra: str):
        argv = ["--task", "sst2", "--method", method, "--model", str(models[family]), *data_args(data, test=False)]
        s = setup([*argv, "--output-dir", str(tmp_path / "never-written"), *extra])
        assert not (tmp_path / "never-written").exists()
        return s.model, s.run.task

    return run


def test_llrd_learning_rate_falls_with_depth(models, data, tmp_path):
    from launch.train import setup

    def groups(family: str, *extra: str) -> tuple[float, dict[str, tuple[float, float]]]:
        argv = ["--task", "sst2", "--method", "llrd", "--model", str(models[family]), *data_args(data, test=False)]
        s = setup([*argv, "--output-dir", str(tmp_path / "never"), *extra])
        names = {n for n, _ in s.model.named_parameters()}
        decay = {n for n in names if not n.endswith("bias") and "norm" not in n.lower()}
        built = s.run.method.param_groups(s.model, s.args, decay)
        by_param = {id(p): (g["lr"], g["weight_decay"]) for g in built for p in g["params"]}
        assert len(by_param) == len(names) == sum(len(g["params"]) for g in built)  # each parameter once
        assert s.run.method.record(s.model)["param_groups"]
        return s.args.learning_rate, {n: by_param[id(p)] for n, p in s.model.named_parameters()}

    lr, bert = groups("bert")
    assert bert["bert.embeddings.word_embeddings.weight"] == (pytest.approx(lr * 0.81), 0.01)
    assert bert["bert.encoder.layer.0.attention.self.query.weight"][0] == pytest.approx(lr * 0.9)
    assert bert["bert.encoder.layer.1.output.dense.weight"][0] == pytest.approx(lr)
    assert bert["classifier.weight"][0] == bert["bert.pooler.dense.weight"][0] == pytest.approx(lr)
    assert bert["bert.encoder.layer.0.output.LayerNorm.weight"][1] == 0.0
    lr, t5 = groups("t5", "--lr-decay", "0.5")  # encoder below decoder: 4 blocks in one pile
    assert t5["transformer.shared.weight"][0] == pytest.approx(lr * 0.5**4)
    assert t5["transformer.encoder.block.0.layer.0.SelfAttention.q.weight"][0] == pytest.approx(lr * 0.5**3)
    assert t5["transformer.encoder.final_layer_norm.weight"][0] == pytest.approx(lr * 0.5**2)
    assert t5["transformer.decoder.block.1.layer.2.DenseReluDense.wo.weight"][0] == pytest.approx(lr)
    assert t5["classification_head.out_proj.weight"][0] == pytest.approx(lr)
    with pytest.raises(FtctlError, match="--lr-decay must be in"):
        groups("bert", "--lr-decay", "1.5")


def test_adalora_reallocates_ranks_down_to_the_budget(train):
    """The run proves the rank update ran: without it every layer would keep init_r (a plain LoRA of rank 12)."""
    import json

    from conftest import run_json

    short = "--max-steps 24 --batch-size 8 --eval-strategy no --save-strategy no --report-to none --learning-rate 5e-3"
    run = train(*short.split(), method="adalora", fast=False)
    facts = run_json(run)["method"]["adalora"]
    ranks = facts["final_ranks"]
    assert facts["init_r"] == 12 and facts["target_r"] == 8 and facts["total_step"] == 24
    assert len(ranks) == 12  # every linear layer of the two blocks: query, key, value, three dense
    assert sum(ranks.values()) == 8 * len(ranks), ranks  # the budget: target rank on average
    pattern = json.loads((run / "adapter_config.json").read_text())["rank_pattern"]
    saved = {name.rsplit(".lora_E", 1)[0]: sum(mask) for name, mask in pattern.items()}
    assert sorted(saved.values()) == sorted(ranks.values())


def test_adalora_needs_a_pruning_phase(build):
    with pytest.raises(FtctlError, match="leave no rank-pruning phase"):
        build("bert", "adalora", "--max-steps", "8", "--adalora-tinit", "5", "--adalora-tfinal", "3")
    with pytest.raises(FtctlError, match="--adalora-init-r .* must be at least the target rank"):
        build("bert", "adalora", "--adalora-init-r", "4")


@pytest.mark.parametrize(("method", "layer"), [("qlora", "Linear4bit"), ("qlora8", "Linear8bitLt")])
def test_qlora_quantizes_the_backbone_and_keeps_the_head_in_full_precision(build, method, layer):
    from methods.base import parameter_counts

    model, task = build("bert", method)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("query.base_layer", "key"))}
    assert kinds == {layer}
    for head in task.head_modules(model.get_base_model()):
        trained = model.get_base_model().get_submodule(head).modules_to_save["default"]
        assert all(p.dtype == torch.float32 and p.requires_grad for p in trained.parameters()), head
    plain, _ = build("bert", "lora")
    assert parameter_counts(model) == parameter_counts(plain)  # packed 4-bit/8-bit weights count as parameters
    config = model.config.quantization_config
    if method == "qlora":
        assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
        assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_soft_prompt_variants_and_options(build):
    from transformers import AutoTokenizer

    model, _ = build("bert", "p_tuning_v2", "--num-virtual-tokens", "5", "--prompt-encoder-hidden-size", "16")
    config = model.peft_config["default"]
    assert config.peft_type == "PREFIX_TUNING" and config.prefix_projection and config.encoder_hidden_size == 16
    assert config.num_virtual_tokens == 5
    model, _ = build("gpt2", "prefix_tuning")
    assert model.peft_config["default"].peft_type == "PREFIX_TUNING"
    assert not model.peft_config["default"].prefix_projection
    model, _ = build("bert", "p_tuning")
    assert model.peft_config["default"].peft_type == "P_TUNING"
    model, _ = build("bert", "prompt_tuning", "--num-virtual-tokens", "4", "--prompt-init-text", "good bad")
    prompt = model.prompt_encoder["default"].embedding.weight
    words = model.get_base_model().get_input_embeddings()
    tokenizer = AutoTokenizer.from_pretrained(model.peft_config["default"].tokenizer_name_or_path)
    token_ids = tokenizer("good bad")["input_ids"]  # [CLS] good bad [SEP], as PEFT tokenizes it
    expected = words.weight[torch.tensor((token_ids * 4)[:4])]
    assert torch.equal(prompt.detach(), expected.detach())
    with pytest.raises(FtctlError, match="--prompt-init-text applies to prompt_tuning only"):
        build("bert", "prefix_tuning", "--prompt-init-text", "good")
    with pytest.raises(FtctlError, match="--prompt-encoder-hidden-size applies to p_tuning and p_tuning_v2"):
        build("bert", "prompt_tuning", "--prompt-encoder-hidden-size", "8")
    with pytest.raises(FtctlError, match="--num-virtual-tokens must be at least 1"):
        build("bert", "prefix_tuning", "--num-virtual-tokens", "0")
    with pytest.raises(FtctlError, match="checkpoints hold the encoded prompt"):
        build("bert", "p_tuning", "--load-best-model-at-end")


def test_ia3_default_and_given_targets(build):
    model, _ = build("bert", "ia3")
    names = [n for n, _ in model.named_parameters() if "ia3_l" in n]
    scaled = {re.sub(r"^.*layer\.\d+\.", "", n).rsplit(".ia3_l", 1)[0] for n in names}
    assert scaled == {"attention.self.key", "attention.self.value", "attention.output.dense", "output.dense"}
    given = "--target-modules k_proj v_proj down_proj --feedforward-modules down_proj"
    model, _ = build("llama", "ia3", *given.split())
    assert set(model.peft_config["default"].feedforward_modules) == {"down_proj"}
    with pytest.raises(FtctlError, match="must also be in --target-modules"):
        build("llama", "ia3", "--target-modules", "k_proj", "--feedforward-modules", "down_proj")
    with pytest.raises(FtctlError, match="not found in this llama model"):
        build("llama", "ia3", "--target-modules", "query")


def test_qlora_names_the_modules_it_keeps_inside_a_zero3_process(models, data):
    """Inside a ZeRO-3 training process transformers builds every model sharded (deepspeed.zero.Init) and then
    initialises it gathered, which failed on QLoRA's weightless copy of the model (NotImplementedError: cannot copy
    out of meta tensor, on both ranks). The copy is built as without DeepSpeed, and the ZeRO-3 setting is back after."""
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from launch.run import runs
    from methods._qlora import kept_full_precision

    argv = ["--task", "sst2_t2t", "--method", "lora", "--model", str(models["llama"]),
            "--train-file", str(data["train"])]  # fmt: skip
    task = runs.from_argv(argv, "ftctl train").task
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        kept = kept_full_precision(task, AutoConfig.from_pretrained(models["llama"]))
        assert "lm_head" in kept and is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()  # not left to later tests of this worker
        del zero3
