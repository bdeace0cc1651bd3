"""The classification task: file formats, labels, pairs, splits and metrics against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ftctl.dataio import read_table
from ftctl.errors import FtctlError
from launch.run.config import resolve


def task_for(*argv: str):
    return resolve(["--task", "classification", *argv], prog="test").task


@pytest.mark.parametrize("suffix", ["csv", "tsv", "txt", "json", "jsonl", "parquet"])
def test_every_file_format_reads_the_same_rows(tmp_path, suffix):
    import pandas as pd

    rows = [{"text": 'he said "fine", then left', "label": "pos"}, {"text": "awful; truly", "label": "neg"}]
    path = tmp_path / f"data.{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == "csv":
        frame.to_csv(path, index=False)
    elif suffix in ("tsv", "txt"):
        path.write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        frame.to_parquet(path)
    ds = read_table(str(path))
    assert ds.column_names == ["text", "label"]
    assert [dict(r) for r in ds] == rows


def test_semicolon_txt_like_the_emotion_dataset(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("text;label_name\ni feel great;joy\ni am so low;sadness\n")
    assert read_table(str(path))["label_name"] == ["joy", "sadness"]


def labelled(tmp_path, labels, name="train.csv", texts=None):
    path = tmp_path / name
    texts = texts or [f"sentence {i}" for i in range(len(labels))]
    path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in zip(texts, labels, strict=True)))
    return str(path)


def test_string_labels_sorted_and_int_labels_kept(tmp_path):
    task = task_for("--train-file", labelled(tmp_path, ["pos", "neg", "neutral"] * 4))
    splits = task.load().splits
    task = task.bind(state=task.check_data(splits, training=True))
    assert task.state["label_names"] == ["neg", "neutral", "pos"]

    task = task_for("--train-file", labelled(tmp_path, [3, 1, 5] * 4, "ints.csv"))
    task = task.bind(state=task.check_data(task.load().splits, training=True))
    assert task.state["label_values"] == [1, 3, 5] and task.state["label_names"] == ["1", "3", "5"]


def test_preset_label_names_follow_the_hub_order(tmp_path):
    path = tmp_path / "emotion.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{n}\n" for i, n in enumerate(["joy", "fear", "anger"] * 3)))
    task = resolve(["--task", "emotion", "--train-file", str(path)], prog="test").task
    task = task.bind(state=task.check_data(task.load().splits, training=True))
    assert task.state["label_names"] == ["sadness", "joy", "love", "anger", "fear", "surprise"]


def test_stratified_seeded_validation_split(tmp_path):
    labels = ["a"] * 40 + ["b"] * 10
    task = task_for("--train-file", labelled(tmp_path, labels), "--validation-split", "0.2", "--seed", "3")
    splits = task.load().splits
    assert len(splits["validation"]) == 10 and len(splits["train"]) == 40
    assert sorted(splits["validation"]["label"]).count("b") == 2  # stratified: 20% of each class
    again = task_for("--train-file", labelled(tmp_path, labels), "--validation-split", "0.2", "--seed", "3")
    again = again.load().splits
    assert again["validation"]["text"] == splits["validation"]["text"]
    capped = (
        task_for("--train-file", labelled(tmp_path, labels), "--max-train-samples", "7", "--max-eval-samples", "3")
        .load()
        .splits
    )
    assert len(capped["train"]) == 7 and len(capped["validation"]) == 3


def test_sentence_pairs_are_encoded_as_pairs(tmp_path, models):
    from transformers import AutoTokenizer

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"a": f"good film {i}", "b": "bad plot", "y": i % 2}) + "\n" for i in range(8)))
    task = task_for("--train-file", str(path), "--text-column", "a", "b", "--label-column", "y")
    splits = task.load().splits
    task = task.bind(state=task.check_data(splits, training=True))
    tokenizer = AutoTokenizer.from_pretrained(models["bert"])
    encoded = task.encode(splits["train"], tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(encoded[0]["input_ids"])
    assert tokens.count("[SEP]") == 2 and encoded[0]["length"] == len(tokens)


def test_glue_hidden_test_labels_are_dropped():
    import datasets

    task = task_for()
    splits = {
        "train": datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}),
        "test": datasets.Dataset.from_dict({"text": ["c"], "label": [-1]}),
    }
    assert "test" not in task.clean(splits)


def test_metrics_against_hand_computed_values():
    task = task_for()
    task = task.bind(state={"label_names": ["a", "b", "c"], "label_values": ["a", "b", "c"]})
    labels = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    probs = np.eye(3)[predicted]
    metrics = task.compute_metrics(probs, labels, None)
    # per class (precision, recall, f1): a (1/2, 1/2, 1/2), b (2/3, 1, 4/5), c (0, 0, 0)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert metrics["recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics["f1"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    details = task.metric_details(probs, labels, None)
    assert details["confusion_matrix"]["matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert details["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})


def test_label_column_with_lists_is_refused(tmp_path):
    path = tmp_path / "lists.jsonl"
    path.write_text("".join(json.dumps({"text": "x", "label": [1, 2]}) + "\n" for _ in range(4)))
    task = task_for("--train-file", str(path))
    with pytest.raises(FtctlError, match="must hold single values"):
        task.check_data(task.load().splits, training=True)


def test_a_sampled_run_holds_out_in_proportion_to_its_sample(tmp_path):
    """--max-train-samples N without validation data: the held-out split is in proportion to the N examples (at
    least 100), not a tenth of the whole file, which every evaluation would score."""
    labels = ["a", "b"] * 2500  # 5,000 rows
    path = labelled(tmp_path, labels)
    small = task_for("--train-file", path, "--max-train-samples", "20").load().splits
    assert len(small["train"]) == 20 and len(small["validation"]) == 100  # the floor (10% of the file: 500)
    larger = task_for("--train-file", path, "--max-train-samples", "1800").load().splits
    assert len(larger["train"]) == 1800 and len(larger["validation"]) == 200  # 200 / (1,800 + 200) = 10%
    whole = task_for("--train-file", path).load().splits
    assert len(whole["validation"]) == 500
    assert not set(small["validation"]["text"]) & set(small["train"]["text"])
