"""The compatibility matrix, cell by cell.

The matrix itself (method x architecture family x task kind) is checked against a table written out here. Then every
method runs on the tiny BERT, GPT-2, Llama and T5 classification models: a supported cell trains a few steps (the
validation loss falls), changes exactly the parameters it should (the saved result, reloaded, against the model
before training), records its numbers, and reloads to the same predictions; a refused cell stops with one clear
error before anything is written. Llama and T5 cells (and the input-prompt methods, which run on BERT only) train
with gradient checkpointing, so every PEFT method also runs checkpointed; GPT-2 prefix tuning, whose model drops
caches under checkpointing, has its own test. The other task kinds get a sample of cells, prefix tuning included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import data_args, eval_losses, read_jsonl, run_json

from ftctl.errors import FtctlError
from ftctl.facts import LaunchFacts
from methods import METHODS
from methods import _matrix as matrix
from methods._matrix import FAMILIES, Cell, TaskShape


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread per test process: with `-n 2` on two cores, two threads each oversubscribe the CPU and
    make these many small runs several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


FAMILY = {"bert": "encoder", "gpt2": "decoder", "llama": "decoder", "t5": "encoder-decoder"}
ALL = set(FAMILIES)

# Task shapes the matrix keys on, as the task kinds define them.
SHAPES = {
    "classification": TaskShape("classification", True, "SEQ_CLS", FAMILIES),
    "regression": TaskShape("regression", True, "SEQ_CLS", FAMILIES),
    "tokens": TaskShape("tokens", True, "TOKEN_CLS", FAMILIES),
    "qa": TaskShape("qa", True, "QUESTION_ANS", FAMILIES),
    "generation": TaskShape("generation", False, "SEQ_2_SEQ_LM", FAMILIES),
}
# The expected matrix: method -> task kind -> the families it refuses; every other cell is supported.
INPUT_PROMPT_REFUSALS = {
    "classification": {"decoder", "encoder-decoder"},
    "regression": {"decoder", "encoder-decoder"},
    "tokens": ALL,
    "qa": ALL,
}
PREFIX_REFUSALS = {kind: {"encoder-decoder"} for kind in ("classification", "regression", "tokens", "qa")}
REFUSED: dict[str, dict[str, set[str]]] = {
    "full": {},
    "freeze": {},
    "head": {"generation": ALL},
    "llrd": {},
    "lora": {},
    "rslora": {},
    "dora": {},
    "qlora": {},
    "qlora8": {},
    "adalora": {},
    "ia3": {},
    "adapter": {},
    "prompt_tuning": INPUT_PROMPT_REFUSALS,
    "p_tuning": INPUT_PROMPT_REFUSALS,
    "prefix_tuning": PREFIX_REFUSALS,
    "p_tuning_v2": PREFIX_REFUSALS,
}
MERGEABLE = {"lora", "rslora", "dora", "qlora", "qlora8", "adalora", "ia3"}

# A few optimizer steps per cell; soft prompts move the loss more slowly and get more steps and a higher rate.
QUICK = ["--batch-size", "8", "--logging-steps", "4", "--report-to", "none", "--eval-on-start", "--no-plan"]
STEPS = {"prompt_tuning": 36, "p_tuning": 36, "prefix_tuning": 36, "p_tuning_v2": 36}
RATE = {"prompt_tuning": "3e-2", "p_tuning": "1e-2", "prefix_tuning": "1e-2", "p_tuning_v2": "1e-2"}
EXTRA = {"adapter": ["--adapter-size", "8"]}
CHECKPOINTED = ("llama", "t5")
RECORDED = {  # what a method adds to run.json's "method" entry
    "llrd": ("lr_decay", "param_groups"),
    "adalora": ("adalora",),
    "qlora": ("quantization",),
    "qlora8": ("quantization",),
    "adapter": ("adapter",),
}


def quick(method: str) -> list[str]:
    steps = str(STEPS.get(method, 12))
    every = ["--eval-strategy", "steps", "--eval-steps", steps, "--save-strategy", "steps", "--save-steps", steps]
    return [*QUICK, "--max-steps", steps, *every, "--learning-rate", RATE.get(method, "5e-3"), *EXTRA.get(method, [])]


def test_every_method_has_an_expected_row():
    assert set(METHODS) == set(REFUSED), "a method was added or removed: give it its expected row here"


@pytest.mark.parametrize("method", list(REFUSED))
def test_matrix_row(method):
    spec = METHODS.get(method)
    for kind, shape in SHAPES.items():
        verdicts = matrix.row(spec.cls, method, shape)
        refused = {family for family, verdict in verdicts.items() if verdict == matrix.REFUSED}
        assert refused == REFUSED[method].get(kind, set()), (method, kind, verdicts)
        assert {v for v in verdicts.values()} <= {matrix.SUPPORTED, matrix.REFUSED}


def test_matrix_table_covers_registered_tasks_and_marks_families_a_task_lacks():
    rows = {row["method"]: row for row in matrix.table(METHODS.items())}
    assert set(rows) == set(METHODS)
    kinds = {shape.kind for shape in matrix.registered_shapes()}
    assert "classification" in kinds
    for name, row in rows.items():
        assert set(row["cells"]) == kinds
        assert row["mergeable"] == (name in MERGEABLE), name
    shape = TaskShape("qa", True, "QUESTION_ANS", ("encoder", "decoder"))
    assert matrix.row(METHODS.get("lora").cls, "lora", shape)["encoder-decoder"] == matrix.NOT_A_TASK_FAMILY


def test_list_methods_prints_every_method_with_its_compatibility_row(capsys):
    from launch.cli import main

    assert main(["list", "--methods"]) == 0
    output = capsys.readouterr().out
    methods_table, _, compatibility = output.partition("compatibility")
    rows = {line.split("│")[1].strip(): line for line in compatibility.splitlines() if line.startswith("│")}
    assert set(METHODS) <= set(rows)
    assert all(name in methods_table for name in METHODS)
    assert "✓ enc x dec x enc-dec" in rows["prompt_tuning"]  # its classification cell
    assert "models without a KV cache" in rows["prefix_tuning"]
    assert "DeepSpeed ZeRO-3 (8-bit)" in rows["qlora8"]


def test_run_time_refusals_name_the_problem_and_the_fix():
    qlora, adalora, llrd = (METHODS.get(n).cls for n in ("qlora", "adalora", "llrd"))
    cell = Cell("encoder", "classification", True, "SEQ_CLS", model_type="bert", task="sst2")
    zero3 = Cell("encoder", "classification", True, "SEQ_CLS", launch=LaunchFacts(device="cpu", deepspeed_stage=3))
    assert "ZeRO-3" in matrix.refusal(qlora, "qlora8", zero3)
    assert matrix.refusal(qlora, "qlora", zero3) is None  # 4-bit shards under ZeRO-3 (quant storage in bf16)
    nowhere = Cell("encoder", "classification", True, "SEQ_CLS", launch=LaunchFacts(device="meta"))
    message = matrix.refusal(qlora, "qlora", nowhere)
    assert "bitsandbytes" in message and "use lora" in message
    assert matrix.refusal(qlora, "qlora", cell) is None  # no launch facts: nothing to refuse on
    ds = Cell("encoder", "classification", True, "SEQ_CLS", launch=LaunchFacts(deepspeed_stage=2))
    assert "DeepSpeed" in matrix.refusal(adalora, "adalora", ds)
    own = Cell("encoder", "classification", True, "SEQ_CLS", launch=LaunchFacts(deepspeed_optimizer=True))
    assert "optimizer" in matrix.refusal(llrd, "llrd", own)


def test_bitsandbytes_runs_here_in_4_and_8_bit():
    """The probe behind the QLoRA refusals: on this machine's CPU both kinds of quantized layer train."""
    from methods._qlora import bnb_problem

    assert bnb_problem("cpu", 4) is None
    assert bnb_problem("cpu", 8) is None


def cells() -> list:
    out = []
    for family in FAMILY:
        for method in REFUSED:
            refused = FAMILY[family] in REFUSED[method].get("classification", set())
            peft = METHODS.get(method).cls.is_peft
            checkpointed = not refused and peft and (family in CHECKPOINTED or method in ("prompt_tuning", "p_tuning"))
            out.append(pytest.param(family, method, refused, checkpointed, id=f"{family}-{method}"))
    return out


def parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("family", "method", "refused", "checkpointed"), cells())
def test_cell(models, data, tmp_path, family, method, refused, checkpointed):
    from ftctl.models import load_kwargs
    from launch.evaluate import main as evaluate
    from launch.train import main, setup

    out = tmp_path / "run"
    argv = ["--task", "sst2", "--method", method, "--model", str(models[family]), *data_args(data, test=False)]
    argv += quick(method) + (["--gradient-checkpointing"] if checkpointed else [])
    if refused:
        with pytest.raises(FtctlError, match=f"method '{method}'"):
            setup([*argv, "--output-dir", str(out)])
        assert not out.exists()
        return

    # the model as training starts (same seed: same head and adapter initialisation), and what it trains
    before = setup([*argv, "--output-dir", str(tmp_path / "not-written")])
    initial = parameters(before.model)
    trainable = {n for n, p in before.model.named_parameters() if p.requires_grad}
    assert trainable and not (tmp_path / "not-written").exists()

    main([*argv, "--output-dir", str(out)])
    losses = eval_losses(out)
    assert losses[-1] < losses[0], f"validation loss did not fall: {losses}"

    record = run_json(out)
    assert record["trainable_params"] == sum(initial[n].numel() for n in trainable)
    assert record["reduction_percent"] == pytest.approx(100 - record["trainable_percent"])
    assert record["saved_weights"]["bytes"] > 0 and record["method"]["trained_modules"]
    peft = METHODS.get(method).cls.is_peft
    assert record["saved_weights"]["files"] == ["adapter_model.safetensors" if peft else "model.safetensors"]
    assert all(record["method"][key] for key in RECORDED.get(method, ()))

    # the saved result, loaded the way `ftctl evaluate` loads it: exactly the trainable parameters moved
    cfg, task, loaded = before.run.cfg, before.run.task, before.run.method
    kwargs = {**load_kwargs(cfg), **loaded.load_kwargs(before.run.context())}
    reloaded = loaded.load_trained(task, str(out), before.run.model_ref, before.tokenizer, kwargs)
    after = {n: p.detach() for n, p in reloaded.named_parameters()}
    unchanged = {n for n in trainable if n in after and after[n].shape == initial[n].shape}
    unchanged = {n for n in unchanged if torch.equal(after[n], initial[n])}
    assert not unchanged, f"trainable parameters that did not change: {sorted(unchanged)[:5]}"
    # PEFT keeps the head's untrained original next to its trained copy; a fresh head is re-drawn at each load
    frozen = {n for n in set(initial) - trainable if ".original_module." not in n}
    moved = {n for n in frozen if n not in after or not torch.equal(after[n], initial[n])}
    assert not moved, f"frozen parameters that changed (or were not restored): {sorted(moved)[:5]}"

    # reloading reproduces the fine-tuned predictions exactly
    evaluate([str(out), "--split", "validation"])
    saved = [r["probabilities"] for r in read_jsonl(out / "predictions.jsonl")]
    reloaded = [r["probabilities"] for r in read_jsonl(out / "eval_predictions.jsonl")]
    assert reloaded == saved


def test_prefix_tuning_under_gradient_checkpointing_matches_plain_training(models, data, tmp_path):
    """GPT-2 drops the cache (the prefix) under checkpointing in its model forward; prefix tuning keeps it, and the
    checkpointed run computes the same losses as the plain one."""
    from launch.train import main

    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        out = tmp_path / name
        argv = ["--task", "sst2", "--method", "prefix_tuning", "--model", str(models["gpt2"])]
        main([*argv, *data_args(data, test=False), *quick("prefix_tuning"), "--output-dir", str(out), *extra])
        runs[name] = [h["loss"] for h in run_json(out)["history"] if "loss" in h]
    assert runs["checkpointed"] == pytest.approx(runs["plain"], rel=1e-4)


@pytest.fixture(scope="session")
def distilbert(tmp_path_factory) -> Path:
    """A tiny DistilBERT: a model without a KV cache, and without PEFT defaults for IA3."""
    import tiny
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    tokenizer = tiny.build_tokenizer("bert")
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("distilbert")
    DistilBertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_model_specific_refusals(distilbert, data, tmp_path):
    from launch.train import setup

    base = ["--task", "sst2", "--model", str(distilbert), *data_args(data, test=False)]
    out = str(tmp_path / "never")
    for method in ("prefix_tuning", "p_tuning_v2"):
        with pytest.raises(FtctlError, match="distilbert models take no cache"):
            setup([*base, "--method", method, "--output-dir", out])
    with pytest.raises(FtctlError, match="ia3 has no default target modules for distilbert"):
        setup([*base, "--method", "ia3", "--output-dir", out])
    s = setup(
        [
            *base,
            "--method",
            "ia3",
            "--target-modules",
            "k_lin",
            "v_lin",
            "lin2",
            "--feedforward-modules",
            "lin2",
            "--output-dir",
            out,
        ]
    )
    assert {n.rsplit(".", 3)[-3] for n, p in s.model.named_parameters() if ".ia3_l." in n} == {"k_lin", "v_lin", "lin2"}
    prompt = setup([*base, "--method", "prompt_tuning", "--output-dir", out])  # input prompts need no cache
    assert any("prompt_encoder" in n for n, p in prompt.model.named_parameters() if p.requires_grad)
    assert not Path(out).exists()


def test_head_is_refused_on_a_task_without_head(models, tmp_path):
    import task_data

    from launch.train import setup

    data = task_data.summaries(tmp_path / "summaries.jsonl", 16, 0)
    with pytest.raises(FtctlError, match="trains only a task head, and task 'summarization' has none"):
        setup(
            [
                "--task",
                "summarization",
                "--method",
                "head",
                "--model",
                str(models["t5"]),
                "--train-file",
                str(data),
                "--output-dir",
                str(tmp_path / "never"),
            ]
        )
    assert not (tmp_path / "never").exists()


def test_deepspeed_refusals(models, data, tmp_path):
    from launch.train import setup

    base = ["--task", "sst2", "--model", str(models["bert"]), *data_args(data, test=False)]
    out = str(tmp_path / "never")
    with pytest.raises(FtctlError, match="ZeRO-3 cannot partition bitsandbytes 8-bit"):
        setup([*base, "--method", "qlora8", "--deepspeed", "zero3", "--output-dir", out])
    with pytest.raises(FtctlError, match="reallocates ranks from the gradients"):
        setup([*base, "--method", "adalora", "--deepspeed", "zero2", "--output-dir", out])
    own = tmp_path / "own_optimizer.json"
    own.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "optimizer": {"type": "AdamW", "params": {}},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
            }
        )
    )
    with pytest.raises(FtctlError, match="brings its own optimizer"):
        setup([*base, "--method", "llrd", "--deepspeed", str(own), "--output-dir", out])
    assert not Path(out).exists()


OTHER_KINDS = [  # (task, family, method, extra options): cells of the other task kinds, through their real tasks
    ("ner", "bert", "prefix_tuning", ["--gradient-checkpointing"]),
    ("ner", "t5", "adapter", ["--adapter-size", "8"]),
    ("squad", "gpt2", "p_tuning_v2", ["--doc-stride", "32"]),
    ("squad", "llama", "qlora", ["--doc-stride", "32"]),
    ("summarization", "gpt2", "prefix_tuning", ["--gradient-checkpointing", "--max-new-tokens", "4"]),
    ("summarization", "t5", "prompt_tuning", ["--max-new-tokens", "4"]),
]


@pytest.mark.parametrize(("task", "family", "method", "extra"), OTHER_KINDS, ids=lambda v: str(v))
def test_other_task_kinds(models, tmp_path, task, family, method, extra):
    """The method trains on the task (the validation loss falls), and what it saved is what it scored: the run
    directory, reloaded by `ftctl evaluate`, gives the run's own final validation metrics."""
    import task_data

    from launch.evaluate import main as evaluate
    from launch.train import main
    from tasks import TASKS

    write = {
        "ner": lambda path, n, seed: task_data.conll(path.with_suffix(".conll"), n, seed),
        "squad": lambda path, n, seed: task_data.squad_flat(path, n, seed),
        "summarization": lambda path, n, seed: task_data.summaries(path, n, seed),
    }[task]
    train, validation = write(tmp_path / "train.jsonl", 96, 1), write(tmp_path / "validation.jsonl", 16, 2)
    out = tmp_path / "run"
    steps = ["--max-steps", "24", "--eval-strategy", "steps", "--eval-steps", "24", "--save-strategy", "steps"]
    argv = ["--task", task, "--method", method, "--model", str(models[family]), "--train-file", str(train)]
    argv += ["--validation-file", str(validation), *steps, "--save-steps", "24", *QUICK, "--learning-rate", "1e-2"]
    main([*argv, *extra, "--output-dir", str(out)])
    losses = eval_losses(out)
    assert losses[-1] < losses[0], f"validation loss did not fall: {losses}"
    final = run_json(out)["metrics"]
    scored = evaluate([str(out), "--split", "validation"])
    metrics = TASKS.get(task).cls.metrics
    assert set(metrics) <= set(final) and set(metrics) <= set(scored), (final, scored)
    assert {m: scored[m] for m in metrics} == pytest.approx({m: final[m] for m in metrics}, abs=1e-6)
