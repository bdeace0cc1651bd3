"""End to end on tiny models: train, save, reload with plain transformers/peft, evaluate (with and without the
baseline), for each backbone family."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import assert_loss_fell, read_jsonl, run_json

RUN_KEYS = (
    "trainable_params",
    "total_params",
    "trainable_percent",
    "train_runtime_s",
    "samples_per_second",
    "peak_memory_mb",
    "metrics",
    "config",
)


def probabilities(model, tokenizer, texts: list[str]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        return model(**enc).logits.float().softmax(-1)


def saved_probabilities(run_dir) -> tuple[list[str], torch.Tensor]:
    rows = read_jsonl(run_dir / "predictions.jsonl")
    return [r["text"] for r in rows], torch.tensor([list(r["probabilities"].values()) for r in rows])


def test_lora_run_directory_and_evaluate(train, data):
    from launch.evaluate import main as evaluate

    run_dir = train()
    record = run_json(run_dir)
    for key in RUN_KEYS:
        assert key in record, key
    assert 0 < record["trainable_params"] < record["total_params"]
    assert record["trainable_percent"] == pytest.approx(100 * record["trainable_params"] / record["total_params"])
    assert set(record["metrics"]) >= {"accuracy", "f1", "precision", "recall"}
    assert record["config"]["task"] == "sst2" and record["config"]["method"] == "lora"
    assert {"accuracy", "f1"} <= set(record["test_metrics"])  # its value is checked against `evaluate` below
    assert_loss_fell(run_dir)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "README.md",
        "config.yaml",
        "spec.json",
        "predictions.jsonl",
    ):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "model.safetensors").exists(), "a LoRA run saves the adapter only"
    saved = json.loads((run_dir / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == ["bert.pooler", "classifier"], saved  # each once, none the model lacks (PEFT adds `score`)
    assert not (run_dir / ".final.tmp").exists()

    result = evaluate([str(run_dir)])
    on_disk = json.loads((run_dir / "eval.json").read_text())
    assert on_disk["accuracy"] == result["accuracy"]
    assert {"accuracy", "f1", "precision", "recall"} <= set(on_disk)
    assert "baseline" not in on_disk
    assert on_disk["info"]["examples"] == 48  # the test split
    # the run's own test score and the evaluate command agree (same model, same data)
    assert on_disk["accuracy"] == pytest.approx(record["test_metrics"]["accuracy"])
    assert len(read_jsonl(run_dir / "eval_predictions.jsonl")) == 48

    out = run_dir.parent / "elsewhere" / "scores.json"
    result = evaluate([str(run_dir), "--baseline", "--output", str(out), "--split", "validation"])
    scored = json.loads(out.read_text())
    assert {"accuracy", "f1"} <= set(scored["baseline"])
    assert scored["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert (out.parent / "scores_baseline_predictions.jsonl").is_file()
    assert scored["details"]["confusion_matrix"]["labels"] == ["negative", "positive"]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_adapter_reloads_with_plain_peft(train, models, family):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = train(family=family)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    base = AutoModelForSequenceClassification.from_pretrained(
        models[family], num_labels=2, pad_token_id=tokenizer.pad_token_id
    )
    texts, saved = saved_probabilities(run_dir)
    untrained = probabilities(base, tokenizer, texts)
    model = PeftModel.from_pretrained(base, run_dir)
    reloaded = probabilities(model, tokenizer, texts)
    torch.testing.assert_close(reloaded, saved, atol=2e-6, rtol=0)
    assert not torch.allclose(untrained, saved, atol=1e-3), "the adapter changed nothing: head not saved?"


def test_full_model_reloads_with_automodel(train):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = train(method="full")
    assert (run_dir / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    texts, saved = saved_probabilities(run_dir)
    torch.testing.assert_close(probabilities(model, tokenizer, texts), saved, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "family,method",
    [
        ("bert", "head"),
        ("bert", "freeze"),
        ("gpt2", "lora"),
        ("gpt2", "full"),
        ("llama", "lora"),
        ("llama", "full"),
        ("t5", "lora"),
        ("t5", "full"),
    ],
)
def test_family_trains_and_evaluates(train, family, method):
    from launch.evaluate import main as evaluate

    run_dir = train(family=family, method=method)
    record = run_json(run_dir)
    assert record["model"]["family"] == {"bert": "encoder", "t5": "encoder-decoder"}.get(family, "decoder")
    assert_loss_fell(run_dir)
    result = evaluate([str(run_dir)])
    assert {"accuracy", "f1", "precision", "recall"} <= set(result)


def test_evaluate_data_file_is_scored_whole(train, data, tmp_path):
    """A run capped its own evaluation splits (--max-eval-samples); a file given with --data is scored whole unless
    evaluate is given its own cap."""
    from launch.evaluate import main as evaluate

    run_dir = train(
        "--max-eval-samples",
        "10",
        "--epochs",
        "1",
        "--eval-strategy",
        "no",
        "--save-strategy",
        "no",
        "--no-eval-on-start",
    )
    assert run_json(run_dir)["data"]["validation_examples"] == 10
    whole = evaluate([str(run_dir), "--data", str(data["test"]), "--output", str(tmp_path / "whole.json")])
    assert whole["info"]["examples"] == 48
    capped = evaluate(
        [
            str(run_dir),
            "--data",
            str(data["test"]),
            "--max-eval-samples",
            "5",
            "--output",
            str(tmp_path / "capped.json"),
        ]
    )
    assert capped["info"]["examples"] == 5
    assert evaluate([str(run_dir), "--output", str(tmp_path / "own.json")])["info"]["examples"] == 10


def test_checkpoint_directory_evaluates(train):
    from launch.evaluate import main as evaluate

    run_dir = train("--save-total-limit", "2")
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert checkpoints and all((c / "spec.json").is_file() for c in checkpoints)
    result = evaluate([str(checkpoints[0])])
    assert 0 <= result["accuracy"] <= 1
    assert (checkpoints[0] / "eval.json").is_file()


def test_training_time_leaves_out_the_evaluations(train, tmp_path):
    """run.json's cost numbers measure what they name: with an evaluation at every step on a validation set much
    larger than the training batches, the time spent evaluating is recorded apart, and the report's training time
    column is the training time alone."""
    import datasets

    from launch.studies.report import build

    big = tmp_path / "big_validation.jsonl"
    rows = [{"sentence": f"the film was good and really lovely {i}", "label": 1} for i in range(800)]
    datasets.Dataset.from_list(rows).to_json(str(big))
    out = train("--validation-file", str(big), "--max-steps", "4", "--eval-strategy", "steps", "--eval-steps", "1",
                "--save-strategy", "steps", "--save-steps", "2", "--no-eval-on-start", name="heavy")  # fmt: skip
    record = run_json(out)
    assert record["eval_runtime_s"] > record["train_runtime_s"] > 0
    assert record["train_runtime_s"] + record["eval_runtime_s"] < record["wall_time_s"]
    assert record["samples_per_second"] == pytest.approx(record["train_samples"] / record["train_runtime_s"])
    report = build([str(out)], tmp_path / "report")
    assert report["tasks"][0]["rows"][0]["train_runtime_s"] == record["train_runtime_s"]


def test_model_card_is_one_the_hub_reads(train, tmp_path):
    """README.md is a huggingface_hub model card: base model, library, tags and model-index results with the run's
    metrics; `ftctl evaluate --baseline` adds the zero-shot baseline's."""
    from huggingface_hub import ModelCard

    from launch.evaluate import main as evaluate

    out = train("--max-steps", "4", name="card")
    record = run_json(out)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and "ftctl" in card.data.tags and "sst2" in card.data.tags
    assert card.data.base_model == record["model"]["name_or_path"]
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("validation", "accuracy")] == pytest.approx(record["metrics"]["accuracy"])
    assert results[("test", "f1")] == pytest.approx(record["test_metrics"]["f1"])
    scored = evaluate([str(out), "--baseline"])
    card = ModelCard.load(out / "README.md")
    baseline = {r.metric_type: r.metric_value for r in card.data.eval_results if "baseline" in r.dataset_split}
    assert baseline["accuracy"] == pytest.approx(scored["baseline"]["accuracy"])
    assert "Before fine-tuning" in card.text


def test_adapter_run_loads_with_plain_peft_and_names_its_labels(train):
    """The model card's way, with no ftctl import: the base with the recorded head settings, the adapter on top;
    predictions come out as the task's label names."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = train("--max-steps", "4", name="plain")
    record = run_json(out)
    args = dict(record["task"]["load_args"])  # as the card's snippet writes them (JSON keeps int keys as strings)
    args["id2label"] = {int(k): v for k, v in args["id2label"].items()}
    base = AutoModelForSequenceClassification.from_pretrained(record["model"]["name_or_path"], **args)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        logits = model(**tokenizer(["a good film", "a dull plot"], return_tensors="pt", padding=True)).logits
    names = {model.config.id2label[int(i)] for i in logits.argmax(-1)}
    assert names <= {"negative", "positive"}
    assert "id2label=" in (out / "README.md").read_text()  # the card's snippet passes them too


def test_a_run_on_the_embedded_model_names_its_hub_id(tmp_path):
    """An adapter of the embedded MiniLM names `sentence-transformers/all-MiniLM-L6-v2` as its base (a path into
    this installation would break when the run is copied); ftctl resolves that id to its embedded copy."""
    from launch.evaluate import main as evaluate
    from launch.train import main

    out = tmp_path / "embedded"
    main(["--task", "sst2", "--method", "lora", "--max-steps", "2", "--report-to", "none", "--eval-strategy", "no",
          "--save-strategy", "no", "--output-dir", str(out)])  # fmt: skip
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "accuracy" in evaluate([str(out)])
    offline_card_snippet_loads_a_copy(out, tmp_path)


def offline_card_snippet_loads_a_copy(out, tmp_path):
    """The run copied elsewhere, loaded by its model card's own snippet in a process that never imports ftctl, with
    no network and an empty Hugging Face cache: it predicts what the run does here. By its hub id alone (what
    `AutoPeftModel*` reads from adapter_config.json) the same process cannot load it."""
    import shutil
    import subprocess
    import sys

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    copy = shutil.copytree(out, tmp_path / "elsewhere" / "run", ignore=shutil.ignore_patterns("checkpoint-*"))
    card = (copy / "README.md").read_text()
    snippet = card.split("## Use it\n\n```python\n", 1)[1].split("\n```", 1)[0].replace("<this directory>", str(copy))
    texts = ["a good film", "a dull plot", "i hated every minute"]
    probe = f"""
import json, sys, torch
with torch.no_grad():
    logits = model.eval()(**tokenizer({texts!r}, return_tensors="pt", padding=True)).logits
mine = sorted(m for m in sys.modules if m.split(".")[0] in ("ftctl", "launch", "tasks", "methods"))
print(json.dumps({{"logits": logits.tolist(), "ftctl_modules": mine}}))
"""
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "empty-hf-home"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    ran = subprocess.run([sys.executable, "-c", snippet + probe], capture_output=True, text=True, env=env,
                         cwd=tmp_path / "elsewhere", timeout=300)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.splitlines()[-1])
    assert result["ftctl_modules"] == []
    record = run_json(out)
    head = dict(record["task"]["load_args"])
    head["id2label"] = {int(k): v for k, v in head["id2label"].items()}
    base = AutoModelForSequenceClassification.from_pretrained(record["model"]["name_or_path"], **head)
    here = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        expected = here(**AutoTokenizer.from_pretrained(str(out))(texts, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-5)

    by_hub_id = f"from peft import AutoPeftModelForSequenceClassification as A; A.from_pretrained({str(copy)!r})"
    refused = subprocess.run([sys.executable, "-c", by_hub_id], capture_output=True, text=True, env=env,
                             cwd=tmp_path / "elsewhere", timeout=300)  # fmt: skip
    said = refused.stderr.lower()
    assert refused.returncode != 0 and ("offline" in said or "connect" in said), refused.stderr[-2000:]


def test_a_tie_on_the_primary_metric_keeps_the_checkpoint_with_the_lowest_loss(train, monkeypatch, capsys):
    """Every evaluation scores the same accuracy (as on a small validation set): the kept checkpoint is the one with
    the lowest validation loss, not the earliest, and the console says which and why."""
    from tasks.classification import ClassificationTask

    scored = ClassificationTask.compute_metrics
    monkeypatch.setattr(ClassificationTask, "compute_metrics", lambda self, *a: {**scored(self, *a), "accuracy": 0.75})
    steps = ["--eval-strategy", "steps", "--eval-steps", "6", "--save-strategy", "steps", "--save-steps", "6"]
    run_dir = train(*steps, "--max-steps", "24")
    record = run_json(run_dir)
    losses = {h["step"]: h["eval_loss"] for h in record["history"] if "eval_loss" in h and h["step"] > 0}
    best = min(losses, key=lambda step: (losses[step], -step))
    assert best != min(losses), f"the lowest loss must not be the first evaluation here: {losses}"
    assert record["best_checkpoint"].endswith(f"checkpoint-{best}"), (record["best_checkpoint"], losses)
    said = " ".join(capsys.readouterr().out.split())
    assert f"kept step {best} of 24: best accuracy 0.7500, the lowest validation loss of the {len(losses)}" in said
