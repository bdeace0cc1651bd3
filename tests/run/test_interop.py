"""Run directories work anywhere in the Hugging Face ecosystem: each task family's run, adapter and full model, is
loaded by plain transformers/peft code in a process that never imports ftctl (tests/run/plain_hf.py), through the
Auto classes, `AutoPeftModelFor*` and `pipeline` (where transformers 5 still has one for the task), and predicts
what the run itself recorded, with the task's real label names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import task_data
import tiny
from conftest import read_jsonl

COMMON = ["--max-steps", "6", "--batch-size", "8", "--learning-rate", "5e-3", "--report-to", "none",
          "--save-strategy", "no", "--eval-strategy", "no"]  # fmt: skip
QA = ["--max-length", "64", "--doc-stride", "16"]
EMOTIONS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def six_classes(path: Path, n: int, seed: int) -> Path:
    """A 6-class set: the class is which positive/negative word pair a sentence carries."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = i % len(EMOTIONS)
        words = rng.sample(tiny.FILLER, 3) + [tiny.POSITIVE[k], tiny.NEGATIVE[k]]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": EMOTIONS[k]})
    return task_data.write_jsonl(path, rows)


@pytest.fixture(scope="module")
def loaded(models, data, tmp_path_factory) -> dict:
    """Train one run per (task family, adapter or full), then load them all with plain HF code in one process."""
    from launch.train import main

    d = tmp_path_factory.mktemp("interop")
    emotions = ["--task", "classification", "--train-file", str(six_classes(d / "emo.jsonl", 120, 1)),
                "--text-column", "text", "--label-column", "label"]  # fmt: skip
    ner = ["--task", "ner", "--train-file", str(task_data.conll(d / "ner.txt", 40, 1))]
    stsb = ["--task", "stsb", "--train-file", str(task_data.similarity(d / "s.tsv", 40, 1))]
    squad = ["--task", "squad", "--train-file", str(task_data.squad_nested(d / "q.json", 40, 1)), *QA]
    summaries = ["--task", "summarization", "--train-file", str(task_data.summaries(d / "s.jsonl", 40, 1)),
                 "--max-new-tokens", "4"]  # fmt: skip
    instructions = ["--task", "instruction", "--train-file", str(task_data.prompt_completions(d / "p.jsonl", 40, 1)),
                    "--num-samples", "4", "--max-new-tokens", "4"]  # fmt: skip
    sst2 = ["--task", "sst2", "--train-file", str(data["train"]), "--validation-file", str(data["validation"])]
    # name: (task arguments, family, method, plain-HF kind, extra case fields)
    runs = {
        "sst2_lora": (sst2, "bert", "lora", "classification", {}),
        "emotion_lora": (emotions, "bert", "lora", "classification", {}),
        "emotion_full": (emotions, "bert", "full", "classification", {}),
        "emotion_gpt2_lora": (emotions, "gpt2", "lora", "classification", {}),
        "ner_lora": (ner, "bert", "lora", "tokens", {}),
        "ner_full": (ner, "bert", "full", "tokens", {}),
        "stsb_lora": (stsb, "bert", "lora", "regression", {}),
        "squad_lora": (squad, "bert", "lora", "qa", {}),
        "squad_full": (squad, "bert", "full", "qa", {}),
        "summarization_t5_lora": (summaries, "t5", "lora", "seq2seq", {}),
        "summarization_t5_full": (summaries, "t5", "full", "seq2seq", {}),
        "instruction_gpt2_lora": (instructions, "gpt2", "lora", "causal", {}),
        "instruction_gpt2_full": (instructions, "gpt2", "full", "causal", {}),
    }
    cases = []
    for name, (task, family, method, kind, extra) in runs.items():
        out = d / name
        main([*task, "--model", str(models[family]), "--method", method, "--output-dir", str(out), *COMMON])
        cases.append({"name": name, "run": str(out), "kind": kind, "adapter": method != "full", **extra})
    spec = d / "cases.json"
    spec.write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("plain_hf.py")), str(spec)],
        capture_output=True, text=True, cwd=d, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return {"results": json.loads(result.stdout.strip().splitlines()[-1]), "runs": {c["name"]: c for c in cases}}


def recorded(loaded: dict, name: str) -> list[dict]:
    return read_jsonl(Path(loaded["runs"][name]["run"]) / "predictions.jsonl")[:4]


def test_plain_code_never_imported_ftctl(loaded):
    assert loaded["results"]["ftctl_modules"] == []


@pytest.mark.parametrize("name", ["sst2_lora", "emotion_lora", "emotion_full", "emotion_gpt2_lora"])
def test_classification_predicts_the_recorded_label_names(loaded, name):
    got = loaded["results"][name]
    expected = [r["prediction"] for r in recorded(loaded, name)]
    assert got["auto"] == expected and got["pipeline"] == expected
    names = EMOTIONS if "emotion" in name else ["negative", "positive"]
    assert set(expected) <= set(names)


def test_adapter_names_its_base_and_the_card_passes_the_head_settings(loaded):
    """The head settings the plain code needs are written in the card's snippet and in run.json; the adapter names
    its base by the path or hub id it came from, never a path into a virtualenv."""
    run = Path(loaded["runs"]["emotion_lora"]["run"])
    adapter = json.loads((run / "adapter_config.json").read_text())
    record = json.loads((run / "run.json").read_text())
    assert adapter["base_model_name_or_path"] == record["model"]["name_or_path"]
    assert record["task"]["load_args"]["num_labels"] == 6
    card = (run / "README.md").read_text()
    assert "num_labels=6" in card and "'surprise'" in card


@pytest.mark.parametrize("name", ["ner_lora", "ner_full"])
def test_ner_tags_words_with_the_recorded_tags(loaded, name):
    got = loaded["results"][name]
    assert got["auto"] == [r["prediction"] for r in recorded(loaded, name)]
    assert set(got["pipeline"]) <= {"B-POS", "I-POS", "B-NEG", "I-NEG"}


def test_stsb_scores_equal_the_recorded_ones(loaded):
    got = loaded["results"]["stsb_lora"]
    expected = [r["prediction"] for r in recorded(loaded, "stsb_lora")]
    assert got["auto"] == pytest.approx(expected, abs=1e-5)
    assert got["pipeline"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name", ["squad_lora", "squad_full"])
def test_qa_finds_the_recorded_span(loaded, name):
    got = loaded["results"][name]["auto"]
    for answer, row in zip(got, recorded(loaded, name), strict=True):
        assert answer["text"] == row["prediction"]
        assert answer["score"] == pytest.approx(row["score"], abs=1e-3)


@pytest.mark.parametrize("name", ["summarization_t5_lora", "summarization_t5_full"])
def test_seq2seq_generates_the_recorded_text(loaded, name):
    assert loaded["results"][name]["auto"] == [r["prediction"] for r in recorded(loaded, name)]


@pytest.mark.parametrize("name", ["instruction_gpt2_lora", "instruction_gpt2_full"])
def test_causal_lm_generates_the_recorded_text(loaded, name):
    got = loaded["results"][name]
    expected = [r["generated"] for r in recorded(loaded, name)]
    assert got["auto"] == expected and got["pipeline"] == expected
