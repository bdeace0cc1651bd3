"""Task data: every accepted file layout reads, preprocessing is right (sub-word labels, QA windows, target-only
loss for generation), and bad data stops with one clear line before anything is written."""

from __future__ import annotations

import json

import pytest
import task_data
from conftest import data_args

from ftctl.errors import FtctlError, run_main
from ftctl.vocab import Family
from launch.run.config import resolve


def task_for(*argv: str):
    return resolve(list(argv), prog="test").task


def loaded(*argv: str):
    task = task_for(*argv)
    splits = task.load().splits
    return task.bind(state=task.check_data(splits, training=True)), splits


def fitted(task, family: Family, model_type: str):
    """The task bound to a backbone of this family and type, as the run loader binds it."""
    config = type("Config", (), {"model_type": model_type})()
    return task.bind(fit=task.check_model(config, family))


def tokenizer(models, family: str, task=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[family])
    if task is not None:
        task.prepare_tokenizer(tok, "decoder" if family in ("gpt2", "llama") else "encoder")
    return tok


# ---- token classification ------------------------------------------------------------------------------------
def test_conll_file_by_path_with_docstart(tmp_path):
    path = task_data.conll(tmp_path / "eng.train", 5, 1)
    task, splits = loaded("--task", "conll2003", "--train-file", str(path), "--validation-split", "0.4")
    assert splits["train"].column_names == ["tokens", "ner_tags"]
    assert len(splits["train"]) + len(splits["validation"]) == 5  # -DOCSTART- is not a sentence
    assert task.state["label_names"][0] == "O" and {"B-POS", "B-NEG"} <= set(task.state["label_names"])
    conll = tmp_path / "conll.txt"
    conll.write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n")
    task, _ = loaded("--task", "conll2003", "--train-file", str(conll), "--validation-file", str(conll))
    assert task.state["label_names"][:3] == ["O", "B-PER", "I-PER"]  # the hub's order, for the preset's tags


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_ner_labels_on_first_subword_only(models, tmp_path, family):
    path = tmp_path / "ner.jsonl"
    rows = [{"tokens": ["wonderfulgreat", "film"], "ner_tags": ["B-POS", "O"]}] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, splits = loaded("--task", "ner", "--train-file", str(path), "--validation-file", str(path))
    tok = tokenizer(models, family, task)
    row = task.encode(splits["train"], tok)[0]
    ids = task.label_names
    real = [label for label in row["labels"] if label != -100]
    assert real == [ids.index("B-POS"), ids.index("O")]  # one label per word, however many sub-words
    assert len(row["word_starts"]) == 2 and row["labels"][row["word_starts"][0]] == ids.index("B-POS")

    all_tokens = task_for("--task", "ner", "--train-file", str(path), "--label-all-tokens")
    all_tokens = all_tokens.bind(state=task.state)
    labelled = [x for x in all_tokens.encode(splits["train"], tok)[0]["labels"] if x != -100]
    assert len(labelled) > 2 and ids[labelled[0]] == "B-POS" and ids[labelled[1]] in ("I-POS", "B-POS")


def test_ner_bad_data(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": ["a", "b"], "ner_tags": ["O"]}) + "\n")
    with pytest.raises(FtctlError, match="sentence 1 has 2 words but 1 tags"):
        loaded("--task", "ner", "--train-file", str(bad), "--validation-file", str(bad))
    cols = tmp_path / "cols.jsonl"
    cols.write_text(json.dumps({"words": ["a"], "ner": ["O"]}) + "\n")
    with pytest.raises(FtctlError, match="no column 'tokens'; columns found: words, ner"):
        loaded("--task", "ner", "--train-file", str(cols), "--validation-file", str(cols))
    one = tmp_path / "one.txt"
    one.write_text("word\n\n")
    with pytest.raises(FtctlError, match="line 1 has one column"):
        loaded("--task", "ner", "--train-file", str(one))


# ---- similarity ---------------------------------------------------------------------------------------------------
def test_stsb_tsv_and_bad_scores(tmp_path):
    path = task_data.similarity(tmp_path / "train.tsv", 10, 1)
    task, splits = loaded("--task", "stsb", "--train-file", str(path))
    assert isinstance(float(splits["train"][0]["score"]), float)
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence1\tsentence2\tscore\na\tb\thigh\nc\td\t1.0\n")
    with pytest.raises(FtctlError, match="non-numeric score 'high'"):
        loaded("--task", "stsb", "--train-file", str(bad), "--validation-file", str(bad))
    with pytest.raises(FtctlError, match="give --text-column twice"):
        loaded("--task", "stsb", "--train-file", str(path), "--text-column", "sentence1")


# ---- question answering ---------------------------------------------------------------------------------------
def test_squad_layouts_read_the_same(tmp_path):
    nested = task_data.squad_nested(tmp_path / "nested.json", 6, 1)
    a = task_for("--task", "squad").read_file(str(nested), "data")
    flat = tmp_path / "flat.jsonl"  # flat rows, answers as a list of {text, answer_start}
    rows = [{"id": r["id"], "question": r["question"], "context": r["context"],
             "answers": [{"text": t, "answer_start": s} for t, s in zip(*r["answers"].values(), strict=True)]}
            for r in a]  # fmt: skip
    flat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = task_for("--task", "squad").read_file(str(flat), "data")
    assert a["question"] == b["question"] and a["context"] == b["context"] and a["answers"] == b["answers"]
    assert len(a) == 6 and a[0]["answers"]["text"][0] in a[0]["context"]


def test_qa_windows_keep_every_answer(models, tmp_path):
    """A long context cut into overlapping windows: the answer is labelled in the window(s) that hold it and the
    others point at the null position; offsets map the labelled span back to the answer text."""
    context = " ".join(["film plot story music"] * 12 + ["superb"] + ["room staff hotel"] * 10)
    row = {"id": "x", "question": "what was good", "context": context,
           "answers": {"text": ["superb"], "answer_start": [context.index("superb")]}}  # fmt: skip
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(row) + "\n")
    task, splits = loaded("--task", "squad", "--train-file", str(path), "--validation-file", str(path),
                          "--max-length", "48", "--doc-stride", "16")  # fmt: skip
    features = task.encode(splits["train"], tokenizer(models, "bert", task))
    assert len(features) >= 3 and set(features["example"]) == {0}
    labelled = [f for f in features if f["start_positions"] != f["null_index"]]
    assert labelled
    for f in labelled:
        start, end = f["offsets"][f["start_positions"]][0], f["offsets"][f["end_positions"]][1]
        assert context[start:end] == "superb"
    assert all(len(f["input_ids"]) <= 48 for f in features)


def test_qa_bad_data(tmp_path):
    rows = [{"id": "1", "question": "q", "context": "a b c", "answers": {"text": ["zebra"], "answer_start": [0]}}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FtctlError, match="the answer 'zebra' is not found in its context"):
        loaded("--task", "squad", "--train-file", str(path), "--validation-file", str(path))
    empty = tmp_path / "unanswerable.json"
    task_data.squad_nested(empty, 4, 1, unanswerable=1.0)
    with pytest.raises(FtctlError, match="use --task squad_v2"):
        loaded("--task", "squad", "--train-file", str(empty), "--validation-file", str(empty))
    loaded("--task", "squad_v2", "--train-file", str(empty), "--validation-file", str(empty))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"q": "a", "c": "b"}) + "\n")
    with pytest.raises(FtctlError, match=r"no column\(s\) question, context, answers; columns found: q, c"):
        loaded("--task", "squad", "--train-file", str(other), "--validation-file", str(other))


# ---- generation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_learns_the_target_and_eos_only(models, tmp_path, family):
    path = task_data.summaries(tmp_path / "sum.jsonl", 4, 1)
    task, splits = loaded("--task", "summarization", "--train-file", str(path), "--validation-file", str(path))
    task = fitted(task, Family.DECODER, family)
    tok = tokenizer(models, family, task)
    row = task.encode(splits["train"], tok)[0]
    prompt, labels = row["prompt_ids"], row["labels"]
    assert row["input_ids"][: len(prompt)] == prompt  # generation sees the prompt alone
    assert labels[: len(prompt)] == [-100] * len(prompt)  # no loss on the prompt
    assert labels[len(prompt) :] == row["input_ids"][len(prompt) :] and labels[-1] == tok.eos_token_id
    assert tok.decode(labels[len(prompt) : -1]).strip() == splits["train"][0]["summary"]
    if family == "llama":
        assert tok.pad_token == "<unk>" and tok.pad_token_id != tok.eos_token_id  # a real pad token

    batch = task.collator(tok)([task.encode(splits["train"], tok)[i] for i in range(2)])
    assert (batch["generation_attention_mask"][:, -1] == 1).all()  # prompts padded on the left
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding never in the loss


def test_encoder_decoder_prefix_and_labels(models, tmp_path):
    path = task_data.translations(tmp_path / "tr.jsonl", 4, 1)
    task, splits = loaded("--task", "wmt16_en_ro", "--train-file", str(path), "--validation-file", str(path))
    task = fitted(task, Family.ENCODER_DECODER, "t5")
    tok = tokenizer(models, "t5", task)
    row = task.encode(splits["train"], tok)[0]
    source = splits["train"][0]["translation"]["en"]
    assert row["input_ids"] == tok(f"translate English to Romanian: {source}")["input_ids"]  # the T5 prefix
    assert row["labels"][-1] == tok.eos_token_id and "prompt_ids" not in row
    assert tok.decode(row["labels"], skip_special_tokens=True) == splits["train"][0]["translation"]["ro"]


def test_translation_inputs(tmp_path):
    src, tgt = tmp_path / "train.source", tmp_path / "train.target"
    src.write_text("good film\nbad food\n")
    tgt.write_text("bad film\ngood food\n")
    task = task_for("--task", "wmt16_en_ro")
    assert task.read_file(str(src), "data")["ro"] == ["bad film", "good food"]
    en = tmp_path / "train.en"
    en.write_text("a\n")
    (tmp_path / "train.ro").write_text("b\nc\n")
    with pytest.raises(FtctlError, match="have 1 and 2 lines"):
        task.read_file(str(en), "data")
    pretty = tmp_path / "pretty.json"  # JSON objects one after another, pretty-printed
    pretty.write_text('{\n "translation": {"en": "a", "ro": "b"}\n} {\n "translation": {"en": "c", "ro": "d"}\n}\n')
    assert len(task.read_file(str(pretty), "data")) == 2
    with pytest.raises(FtctlError, match="needs --source-lang"):
        task_for("--task", "translation").lang("source")


def test_instruction_formats(tmp_path):
    task = fitted(task_for("--task", "alpaca"), Family.DECODER, "llama")
    # prompts depend on the tokenizer (a chat template or not): one without a template gets the Alpaca layout
    task = task.bind(tokenizer=type("NoTemplate", (), {"chat_template": None})())
    with_input = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    head, body, tail = task.prompt_parts(with_input)
    assert "### Input:\n" in head and body == "2 and 3" and tail.endswith("### Response:\n")
    assert task.target(with_input) == "5"
    assert "### Input" not in "".join(task.prompt_parts({"instruction": "Hi", "input": "", "output": "x"}))
    chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}
    assert task.prompt_parts(chat)[1] == "### User:\nhello\n\n### Assistant:\n" and task.target(chat) == "hi there"
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "a", "reply": "b"}) + "\n")
    with pytest.raises(FtctlError, match="not instruction data; columns found: question, reply"):
        loaded("--task", "alpaca", "--train-file", str(path), "--validation-file", str(path))


# ---- nothing written on bad data ------------------------------------------------------------------------------
def test_bad_task_data_writes_nothing(models, data, tmp_path, capsys):
    from launch.train import main

    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence1\tsentence2\tscore\na\tb\thigh\nc\td\t1.0\n")
    out = tmp_path / "out"
    code = run_main(main, ["--task", "stsb", "--model", str(models["bert"]), "--train-file", str(bad),
                           "--validation-file", str(bad), "--output-dir", str(out)])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "non-numeric score" in err[0] and not out.exists()
    code = run_main(main, ["--task", "sst2_t2t", "--model", str(models["t5"]), *data_args(data),
                           "--num-beams", "0", "--output-dir", str(out)])  # fmt: skip
    assert code == 2 and "--num-beams must be at least 1" in capsys.readouterr().err and not out.exists()


def test_a_file_of_texts_is_a_one_column_table(tmp_path):
    """`text` then one text per line, with commas, quotes, tabs and semicolons inside: one column, lines intact."""
    from ftctl import dataio

    path = tmp_path / "texts.txt"
    path.write_text('text\nI loved it, truly "great"\tfilm\nbad; awful\n')
    table = dataio.read_table(str(path))
    assert table.column_names == ["text"]
    assert table["text"] == ['I loved it, truly "great"\tfilm', "bad; awful"]
