"""Every (task, family) pair that claims support: a few training steps on a tiny model and fixture data, the
validation loss falls, and `evaluate` (with the untrained base model as baseline) reports every metric key and
writes per-example predictions. The decoder family runs as GPT-2 and as Llama."""

from __future__ import annotations

import json

import pytest
import task_data
from conftest import assert_loss_fell, data_args, read_jsonl, run_json

from ftctl.errors import run_main

FAST = [
    "--epochs", "3", "--batch-size", "8", "--logging-steps", "4", "--report-to", "none", "--learning-rate", "5e-3",
    "--no-plan",
    "--save-total-limit", "1", "--eval-on-start",
]  # fmt: skip
GENERATION = ["--max-length", "96", "--max-target-length", "8", "--max-new-tokens", "4"]


@pytest.fixture(scope="session")
def files(tmp_path_factory, data) -> dict[str, list[str]]:
    d = tmp_path_factory.mktemp("task-data")

    def pair(name: str, writer, suffix: str, train: int = 40, validation: int = 8, **kw) -> list[str]:
        return [
            "--train-file", str(writer(d / f"{name}-train.{suffix}", train, 1, **kw)),
            "--validation-file", str(writer(d / f"{name}-validation.{suffix}", validation, 2, **kw)),
        ]  # fmt: skip

    return {
        "ner": pair("ner", task_data.conll, "txt", 64, 16),
        "stsb": pair("stsb", task_data.similarity, "tsv", 64, 16),
        "squad": pair("squad", task_data.squad_nested, "json"),
        "squad_v2": pair("squad2", task_data.squad_nested, "json", unanswerable=0.4),
        "summarization": pair("sum", task_data.summaries, "jsonl"),
        "translation": pair("tr", task_data.translations, "jsonl"),
        "instruction": pair("inst", task_data.prompt_completions, "jsonl"),
        "sst2": data_args(data, test=False),
    }


# (preset, family, data files, extra arguments, metric keys)
QA = ["--max-length", "64", "--doc-stride", "16"]
T2T = ("accuracy", "f1", "generation_accuracy", "invalid")
CASES = [
    ("conll2003", "bert", "ner", [], ("precision", "recall", "f1", "accuracy")),
    ("conll2003", "gpt2", "ner", [], ("precision", "recall", "f1", "accuracy")),
    ("ner", "llama", "ner", [], ("precision", "recall", "f1", "accuracy")),
    ("ner", "t5", "ner", [], ("precision", "recall", "f1", "accuracy")),
    ("stsb", "bert", "stsb", [], ("pearson", "spearman")),
    ("stsb", "gpt2", "stsb", [], ("pearson", "spearman")),
    ("stsb", "llama", "stsb", [], ("pearson", "spearman")),
    ("squad", "bert", "squad", QA, ("exact_match", "f1")),
    ("squad", "gpt2", "squad", QA, ("exact_match", "f1")),
    ("squad", "llama", "squad", QA, ("exact_match", "f1")),
    ("squad_v2", "bert", "squad_v2", QA, ("exact_match", "f1", "HasAns_f1", "NoAns_f1")),
    ("squad_gen", "t5", "squad", GENERATION, ("exact_match", "f1")),
    ("squad_gen", "gpt2", "squad", GENERATION, ("exact_match", "f1")),
    ("squad_gen", "llama", "squad", GENERATION, ("exact_match", "f1")),
    ("xsum", "t5", "summarization", [], ("rouge1", "rouge2", "rougeL", "rougeLsum")),
    ("summarization", "gpt2", "summarization", [], ("rouge1", "rouge2", "rougeL", "rougeLsum")),
    ("summarization", "llama", "summarization", [], ("rouge1", "rouge2", "rougeL", "rougeLsum")),
    ("wmt16_en_ro", "t5", "translation", [], ("bleu", "chrf")),
    ("wmt16_en_ro", "gpt2", "translation", [], ("bleu", "chrf")),
    ("translation", "llama", "translation", ["--source-lang", "en", "--target-lang", "ro"], ("bleu", "chrf")),
    ("instruction", "gpt2", "instruction", [], ("perplexity",)),
    ("instruction", "llama", "instruction", [], ("perplexity",)),
    ("instruction", "t5", "instruction", [], ("perplexity",)),
    ("sst2_t2t", "t5", "sst2", ["--max-train-samples", "64", "--max-eval-samples", "8"], T2T),
    ("sst2_t2t", "gpt2", "sst2", ["--max-train-samples", "64", "--max-eval-samples", "8"], T2T),
    ("sst2_t2t", "llama", "sst2", ["--max-train-samples", "64", "--max-eval-samples", "8"], T2T),
]
# `evaluate --baseline` once per task
BASELINE = {
    ("conll2003", "bert"),
    ("stsb", "gpt2"),
    ("squad", "bert"),
    ("squad_v2", "bert"),
    ("squad_gen", "t5"),
    ("xsum", "t5"),
    ("translation", "llama"),
    ("instruction", "gpt2"),
    ("sst2_t2t", "t5"),
}


def train_task(models, tmp_path, preset, family, data, extra) -> tuple:
    from launch.train import main

    out = tmp_path / "run"
    generation = GENERATION if preset not in ("conll2003", "ner", "stsb", "squad", "squad_v2") else []
    argv = ["--task", preset, "--model", str(models[family]), *data, "--output-dir", str(out), *FAST]
    flags = dict(zip(generation[::2], generation[1::2], strict=True))
    argv += [x for flag, value in flags.items() if flag not in extra for x in (flag, value)] + extra
    main(argv)
    return out, argv


@pytest.mark.parametrize("preset,family,source,extra,keys", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_task_trains_and_evaluates(models, files, tmp_path, preset, family, source, extra, keys):
    from launch.evaluate import main as evaluate

    run_dir, _ = train_task(models, tmp_path, preset, family, files[source], extra)
    record = run_json(run_dir)
    assert_loss_fell(run_dir)
    assert set(keys) <= set(record["metrics"]), record["metrics"]
    rows = read_jsonl(run_dir / "predictions.jsonl")
    assert len(rows) == record["data"]["validation_examples"] and "index" in rows[0]

    baseline = (preset, family) in BASELINE
    result = evaluate([str(run_dir), *(["--baseline"] if baseline else [])])
    assert set(keys) <= set(result), result
    for key in keys:
        assert result[key] == pytest.approx(record["metrics"][key], abs=1e-6), key
    if baseline:
        assert set(keys) <= set(result["baseline"])
        assert (run_dir / "eval_baseline_predictions.jsonl").is_file()
    assert len(read_jsonl(run_dir / "eval_predictions.jsonl")) == len(rows)
    check_statistics_reproduce(record, read_jsonl(run_dir / "eval_predictions.jsonl"), result)


def check_statistics_reproduce(record: dict, rows: list[dict], metrics: dict) -> None:
    """The per-example statistics reports resample (tasks/_statistics.py), summed over every example, give back the
    metrics the task's own evaluation reported: corpus-level ones (entity F1, BLEU, Pearson) included."""
    import numpy as np

    from tasks import TASKS
    from tasks.base import ExampleStatistics

    cls = TASKS.get(record["task"]["preset"]).cls
    task = cls.__new__(cls)  # the hooks read only their arguments, as a report calls them
    assert isinstance(task, ExampleStatistics), cls
    state = record["task"]["state"]
    recomputed = task.metrics_from_totals(task.example_statistics(rows, state).sum(axis=0), state)
    assert set(recomputed) <= set(metrics) and recomputed, (recomputed, metrics)
    for name, value in recomputed.items():
        assert float(value) == pytest.approx(metrics[name], rel=1e-6, abs=1e-6), name
    many = np.stack([task.example_statistics(rows, state).sum(axis=0)] * 3)  # vectorized over resamples
    assert all(np.shape(v) == (3,) for v in task.metrics_from_totals(many, state).values())


REFUSED = [
    ("conll2003", "bart", "no token-classification head"),
    ("stsb", "t5", "does not support encoder-decoder"),
    ("squad", "t5", "does not support encoder-decoder"),
    ("squad_gen", "bert", "does not support encoder"),
    ("xsum", "bert", "does not support encoder"),
    ("wmt16_en_ro", "bert", "does not support encoder"),
    ("alpaca", "bert", "does not support encoder"),
]


@pytest.mark.parametrize("preset,family,fragment", REFUSED, ids=[f"{r[0]}-{r[1]}" for r in REFUSED])
def test_unsupported_family_is_refused_in_one_line(models, tmp_path, capsys, preset, family, fragment):
    from launch.train import main

    model = models.get(family) or _bart(tmp_path)
    out = tmp_path / "out"
    code = run_main(main, ["--task", preset, "--model", str(model), "--output-dir", str(out), "--report-to", "none"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not out.exists()


def _bart(tmp_path):
    """A BART config is enough: the refusal happens before weights or a tokenizer are loaded."""
    from transformers import BartConfig

    path = tmp_path / "bart"
    BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1).save_pretrained(path)
    return path


def test_generation_settings_reach_generate(models, files, tmp_path, monkeypatch):
    """--num-beams and --no-repeat-ngram-size are what `generate` receives when the run scores its generations."""
    from transformers import GenerationMixin

    received: list[dict] = []
    original = GenerationMixin.generate

    def generate(self, *args, **kwargs):
        config = kwargs.get("generation_config")
        received.append({**(config.to_dict() if config is not None else {}), **kwargs})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    run_dir, _ = train_task(
        models, tmp_path, "xsum", "t5", files["summarization"],
        ["--num-beams", "2", "--no-repeat-ngram-size", "2", "--epochs", "1"],
    )  # fmt: skip
    assert received, "the run scored generated summaries"
    assert all(call.get("num_beams") == 2 and call.get("no_repeat_ngram_size") == 2 for call in received), received
    config = json.loads((run_dir / "run.json").read_text())["config"]
    assert config["num_beams"] == 2 and config["no_repeat_ngram_size"] == 2


BF16_GENERATION = [("wmt16_en_ro", "t5", "translation"), ("xsum", "gpt2", "summarization")]


@pytest.mark.parametrize("preset,family,source", BF16_GENERATION)
def test_bf16_lora_generates_with_frozen_weights_in_bf16(models, files, tmp_path, preset, family, source):
    """Generation runs outside the forward accelerate wraps in autocast: with LoRA's frozen weights stored in bf16
    it must still run in the training precision (a dtype mismatch once)."""
    run_dir, _ = train_task(models, tmp_path, preset, family, files[source], ["--precision", "bf16", "--epochs", "1"])
    record = run_json(run_dir)
    assert record["precision"] == "bf16" and record["frozen_params_in_autocast_dtype"] > 0
    assert {"bleu", "rougeL"} & set(record["metrics"])
