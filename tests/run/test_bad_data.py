"""Bad and suspicious data, as a user meets them: each refusal is one `error:` line (exit 2, nothing written), each
legal-but-suspicious input one `warning:` line and the run goes on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import data_args
from test_bad_input import check_error

from ftctl.errors import FtctlError, run_main
from launch.run.config import resolve


def train_argv(models, out: Path, *data: str, task: str = "sst2", method: str = "lora") -> list[str]:
    return ["--task", task, "--method", method, "--model", str(models["bert"]), *data, "--output-dir", str(out),
            "--max-steps", "2", "--report-to", "none", "--eval-strategy", "no", "--save-strategy", "no"]  # fmt: skip


def csv(path: Path, text: str, encoding: str = "utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)


@pytest.mark.parametrize(
    "content,fragment",
    [
        ("sentence,label,label\na,1,1\nb,0,0\n", "has the column header 'label' twice"),
        ("sentence,label\ngood,1\n,0\nbad,0\ngreat,1\n", "row 2 has no text in column 'sentence' (an empty cell)"),
    ],
)
def test_bad_tables(models, tmp_path, capsys, content, fragment):
    from launch.train import main

    path = csv(tmp_path / "t.csv", content)
    out = tmp_path / "out"
    code = run_main(main, train_argv(models, out, "--train-file", path, "--validation-file", path))
    check_error(capsys, code, fragment)
    assert not out.exists()


def test_text_column_equal_to_label_column_is_a_label_leak(models, data, tmp_path, capsys):
    from launch.train import main

    out = tmp_path / "out"
    argv = train_argv(models, out, *data_args(data), "--text-column", "label", "--label-column", "label")
    check_error(capsys, run_main(main, argv), "would read its own label (a label leak)")
    assert not out.exists()


def test_labels_differing_only_in_case_are_warned_about(tmp_path, capsys):
    path = csv(
        tmp_path / "t.csv", "text,label\n" + "".join(f"t{i},{lab}\n" for i, lab in enumerate(["pos", "Pos", "neg"] * 4))
    )
    task = resolve(["--task", "classification", "--train-file", path], prog="test").task
    state = task.check_data(task.load().splits, training=True)
    err = capsys.readouterr().err
    assert "warning: " in err and "'Pos' / 'pos'" in err and "differ only in case" in err
    assert len(state["label_names"]) == 3  # legal: three classes as given


def test_not_utf8_and_symlink_loops_and_conll(models, tmp_path, capsys):
    from launch.train import main

    latin = csv(tmp_path / "latin.csv", "sentence,label\ncafé crème,1\nbad,0\n", encoding="latin-1")
    out = tmp_path / "out"
    code = run_main(main, train_argv(models, out, "--train-file", latin, "--validation-file", latin))
    check_error(capsys, code, "is not UTF-8 text (byte 0xe9 at position")
    loop = tmp_path / "loop.csv"
    os.symlink(loop, loop)
    code = run_main(main, train_argv(models, out, "--train-file", str(loop)))
    check_error(capsys, code, "is a symbolic link loop")
    table = csv(tmp_path / "ner.tsv", "sentence\tlabel\nthe film was good\t1\nbad plot\t0\n")
    code = run_main(main, train_argv(models, out, "--train-file", table, "--validation-file", table, task="ner"))
    check_error(capsys, code, "does not look like a CoNLL file")
    assert not out.exists()


def test_output_dir_empty_or_on_a_pseudo_filesystem(models, data, capsys):
    from launch.train import main

    check_error(capsys, run_main(main, train_argv(models, Path("x"), *data_args(data))[:-12] + ["--output-dir", ""]
                                 + ["--max-steps", "2"]), "--output-dir is empty")  # fmt: skip
    if Path("/proc/self").is_dir():
        argv = ["--task", "sst2", "--model", str(models["bert"]), *data_args(data), "--output-dir", "/proc/ftctl-x"]
        check_error(capsys, run_main(main, argv), "does not take new directories")


def test_eval_steps_alone_evaluates_every_n_steps():
    cfg = resolve(["--task", "sst2", "--eval-steps", "5"], prog="test").cfg
    assert (cfg.eval_strategy, cfg.eval_steps, cfg.save_strategy, cfg.save_steps) == ("steps", 5, "steps", 5)
    cfg = resolve(["--task", "sst2", "--eval-steps", "5", "--save-steps", "10"], prog="test").cfg
    assert cfg.eval_strategy == "steps" and cfg.save_steps == 10


def test_squad_answers_at_the_wrong_start_are_relocated_with_a_warning(models, tmp_path, capsys):
    """An answer_start that does not point at its text is moved to the text's first occurrence: the encoded
    start/end positions are the answer's tokens, and the user is told how many moved."""
    from transformers import AutoTokenizer

    rows = [
        {"question": "what?", "context": "alpha beta gamma", "answers": {"text": ["beta"], "answer_start": [0]}},
        {"question": "who?", "context": "delta epsilon", "answers": {"text": ["delta"], "answer_start": [0]}},
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--task", "squad", "--train-file", str(path), "--validation-file", str(path), "--doc-stride", "32"]
    task = resolve(argv, prog="test").task
    splits = task.load().splits
    task.check_data(splits, training=True)
    err = capsys.readouterr().err
    assert "train data: 1 answer(s) have an answer_start that does not point at their text" in err
    tokenizer = AutoTokenizer.from_pretrained(models["bert"])
    encoded = task.encode(splits["train"], tokenizer)
    for row, answer in zip(encoded, ("beta", "delta"), strict=True):
        span = row["input_ids"][row["start_positions"] : row["end_positions"] + 1]
        assert tokenizer.decode(span).strip() == answer, (tokenizer.decode(span), row["start_positions"])


def test_a_run_of_another_task_as_model_is_one_line(models, data, tmp_path, capsys):
    from launch.train import main

    ner = tmp_path / "ner.jsonl"
    ner.write_text("".join(json.dumps({"tokens": ["good", "film"], "ner_tags": ["B-X", "O"]}) + "\n" for _ in range(8)))
    ner_run = tmp_path / "ner-run"
    main(
        train_argv(models, ner_run, "--train-file", str(ner), "--validation-file", str(ner), task="ner", method="full")
    )
    out = tmp_path / "out"
    argv = ["--task", "sst2", "--method", "full", "--model", str(ner_run), *data_args(data), "--output-dir", str(out)]
    line = check_error(capsys, run_main(main, argv), "is an ftctl run of task 'ner', whose head is not one of task")
    assert str(models["bert"]) in line
    assert not out.exists()
    with pytest.raises(FtctlError):
        main(argv)
