"""The memory-lean causal-LM loss (launch/run/lm_loss.py) equals the model's own: the loss and every gradient within
1e-5 relative, with padding, with packed sequences, with a LoRA adapter, with Gemma-2's logit soft-capping, summed
and divided by the Trainer's item count; a whole run with gradient accumulation follows the same loss curve; the
choice is recorded and refused where it cannot run."""

from __future__ import annotations

import json

import chat_models
import pytest
import torch

from ftctl.errors import FtctlError
from launch.run import lm_loss


def tiny(family: str, tmp_path):
    import tiny as tiny_models
    import transformers
    from transformers import AutoModelForCausalLM

    if family == "gemma2":
        path = chat_models.save_chat_model("gemma2", tmp_path / family)
    else:
        path = tiny_models.save_tiny(family, tmp_path / family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert isinstance(model, transformers.PreTrainedModel)
    return model


def batch(vocab: int, packed: bool = False) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (3, 20))
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt without labels
    if packed:
        packed = {"input_ids": ids.view(1, -1), "position_ids": torch.arange(20).repeat(3).view(1, -1)}
        return {**packed, "use_cache": False}, labels.view(1, -1)  # as tasks._generation.PackingCollator gives them
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # padding
    labels[0, -5:] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def losses_and_grads(model, inputs, labels, lean: bool, items):
    model.zero_grad()
    if lean:
        loss = lm_loss.causal_lm_loss(model, dict(inputs), labels, items, "chunked", chunk=7)
    else:
        loss = model(**inputs, labels=labels, num_items_in_batch=items).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "family,packed,lora",
    [("gpt2", False, False), ("llama", False, False), ("llama", True, False), ("gpt2", False, True),
     ("gemma2", False, False)],
)  # fmt: skip
def test_the_lean_loss_equals_the_models_own(family, packed, lora, tmp_path):
    model = tiny(family, tmp_path)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    model.eval()  # no dropout: the two forwards must see the same network (gradients flow in eval mode too)
    if family == "gemma2":
        assert model.config.final_logit_softcapping  # the soft-capping is part of what must match
    inputs, labels = batch(model.config.vocab_size, packed)
    for items in (None, torch.tensor(40)):  # a mean, and a sum over the Trainer's count of the whole step's items
        plain, plain_grads = losses_and_grads(model, inputs, labels, False, items)
        lean, lean_grads = losses_and_grads(model, inputs, labels, True, items)
        torch.testing.assert_close(lean, plain, rtol=1e-5, atol=0)
        assert plain_grads.keys() == lean_grads.keys() and plain_grads
        for name, grad in plain_grads.items():
            torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_run_follows_the_same_loss_curve(models, tmp_path):
    """Through the Trainer, with gradient accumulation (the item count spans the accumulated micro-batches)."""
    import task_data

    from launch.train import main

    data = task_data.prompt_completions(tmp_path / "i.jsonl", 32, 1)
    histories = {}
    for kernel in ("plain", "chunked"):
        out = tmp_path / kernel
        main(["--task", "instruction", "--model", str(models["gpt2"]), "--train-file", str(data), "--method", "lora",
              "--output-dir", str(out), "--max-steps", "6", "--batch-size", "8", "--micro-batch-size", "2",
              "--logging-steps", "1", "--report-to", "none", "--eval-strategy", "no", "--save-strategy", "no",
              "--loss-kernel", kernel, "--num-samples", "0"])  # fmt: skip
        record = json.loads((out / "run.json").read_text())
        assert record["loss_kernel"]["used"] == kernel
        histories[kernel] = [h["loss"] for h in record["history"] if "loss" in h]
    assert len(histories["plain"]) == 6
    assert histories["chunked"] == pytest.approx(histories["plain"], rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_under_bf16_autocast_the_lean_loss_matches_too(models, tmp_path, method):
    """In bf16 the output layer is computed in the forward's autocast (QLoRA keeps it in fp32 beside bf16 hidden
    states: outside autocast the two would not even multiply)."""
    import task_data

    from launch.train import main

    data = task_data.prompt_completions(tmp_path / "i.jsonl", 16, 1)
    losses = {}
    for kernel in ("plain", "chunked"):
        out = tmp_path / f"{method}-{kernel}"
        main(["--task", "instruction", "--model", str(models["llama"]), "--train-file", str(data), "--method", method,
              "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--logging-steps", "1",
              "--precision", "bf16", "--report-to", "none", "--eval-strategy", "no", "--save-strategy", "no",
              "--loss-kernel", kernel, "--num-samples", "0"])  # fmt: skip
        record = json.loads((out / "run.json").read_text())
        assert record["precision"] == "bf16" and record["loss_kernel"]["used"] == kernel
        losses[kernel] = [h["loss"] for h in record["history"] if "loss" in h]
    assert losses["chunked"] == pytest.approx(losses["plain"], rel=2e-2)  # bf16: the same numbers, rounded alike


def test_the_choice_and_its_refusals():
    assert lm_loss.choose("auto", True, None, cuda=False).kernel == "chunked"
    assert lm_loss.choose("auto", False, None, cuda=False).kernel == "plain"
    assert lm_loss.choose("auto", True, "AdaLoRA adds its penalty", cuda=False).kernel == "plain"
    with pytest.raises(FtctlError, match="fused needs a CUDA GPU and Liger Kernel"):
        lm_loss.choose("fused", True, None, cuda=False)
    with pytest.raises(FtctlError, match="is for decoder language-model tasks"):
        lm_loss.choose("chunked", False, None, cuda=False)
    with pytest.raises(FtctlError, match="AdaLoRA adds its penalty; use --loss-kernel plain"):
        lm_loss.choose("chunked", True, "AdaLoRA adds its penalty", cuda=False)


@pytest.mark.parametrize("kernel, used", [("auto", "plain"), ("chunked", None), ("fused", None)])
def test_zero3_trains_decoders_with_the_models_own_loss(models, data, monkeypatch, kernel, used):
    """ZeRO-3 gathers the output layer's shards only inside the model's forward; the lean losses call it after the
    forward (and recompute it in the backward pass), where it has no weight (a CheckpointError on every rank).
    `auto` picks the model's own loss; a lean kernel asked for by name is refused at planning, before any weights
    are loaded (the 2-process run under the shipped config: tests/distributed/test_shipped_configs.py)."""
    from launch.run import runs

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    argv = ["--task", "sst2_t2t", "--method", "lora", "--model", str(models["llama"]), "--train-file",
            str(data["train"]), "--loss-kernel", kernel]  # fmt: skip
    if used is None:
        with pytest.raises(FtctlError, match=f"--loss-kernel {kernel}: DeepSpeed ZeRO-3 shards the output layer"):
            runs.from_argv(argv, "ftctl train")
        return
    run = runs.from_argv(argv, "ftctl train")
    assert lm_loss.for_run(run.task, run.method, False, zero3=True).kernel == used
    assert lm_loss.for_run(run.task, run.method, False, zero3=False).kernel == "chunked"
