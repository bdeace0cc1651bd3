"""Odd and hostile inputs found by trying ftctl as a new user would (round 3), beyond tests/run/test_bad_input.py:
data files, options, decoder options, grid files, run directories, launcher options and signals. Bad input ends in
one `error:` line, exit 2, nothing written; legal but suspicious input trains with one `warning:` line."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli, data_args
from test_bad_input import check_error

from ftctl.errors import run_main

sys.path.insert(0, str(Path(__file__).parents[1] / "studies"))
from test_grid import write_grid  # noqa: E402  (a sibling test folder's helper)

ROWS = [{"sentence": f"sentence {i} fine", "label": i % 2} for i in range(12)]


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def table(n: int, sep: str = ",") -> str:
    return "".join(f"sentence {i}{sep}{i % 2}\n" for i in range(n))


DATA = {  # file name -> (content, the error's words)
    "broken_line.jsonl": (
        jsonl(ROWS[:4]) + '{"sentence": "x", "label": \n' + jsonl(ROWS[4:]),
        "not valid JSON (line 5",
    ),
    "list_line.jsonl": (jsonl(ROWS[:3]) + "[1, 2]\n" + jsonl(ROWS[3:]), "must hold a list of JSON objects"),
    "object.json": (json.dumps(ROWS[0]), "must hold a list of JSON objects"),
    "columns.json": (json.dumps({"sentence": ["a", "b"], "label": [0, 1]}), "must hold a list of JSON objects"),
    "number_text.jsonl": (
        jsonl(ROWS[:3] + [{"sentence": 42, "label": 1}] + ROWS[3:]),
        "'sentence' holds a number in row 4 but a text in row 1",
    ),
    "list_label.jsonl": (
        jsonl(ROWS[:3] + [{"sentence": "x", "label": [1]}] + ROWS[3:]),
        "'label' holds a list in row 4 but a number in row 1",
    ),
    "null_text.jsonl": (jsonl(ROWS[:3] + [{"sentence": None, "label": 1}] + ROWS[3:]), "row 4 has no text"),
    "ragged.csv": ("sentence,label\n" + table(4) + "a,1,extra\n" + table(4), "line 6 has 3 comma-separated fields"),
    # pandas took a first row with one field more for an index and shifted every row: texts read as labels
    "ragged_first.csv": ("sentence,label\na,1,extra\n" + table(8), "line 2 has 3 comma-separated fields, the header 2"),
    "quoted_tab.tsv": (
        'sentence\tlabel\n"a\tb"\t1\n' + table(8, "\t"),
        "texts holding a tab cannot be read from a TSV",
    ),
    "latin1.csv": (None, "is not UTF-8 text (byte 0xe9"),
    "whitespace.csv": ("sentence,label\n" + table(5) + '"   ",1\n' + table(5), "row 6 has no text"),
    "one_row.csv": ("sentence,label\na,1\n", "has a single class"),
    "train.jsonl.gz": (None, "unsupported type '.gz'"),
    "corrupt.parquet": ("not parquet at all", "cannot parse train file"),
}


@pytest.mark.parametrize("name", list(DATA))
def test_odd_data_files(name, models, data, tmp_path, capsys):
    from launch.train import main

    content, fragment = DATA[name]
    path = tmp_path / name
    if name == "latin1.csv":
        path.write_bytes(("sentence,label\n" + "café crème,1\n" * 3 + table(8)).encode("latin-1"))
    elif name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(jsonl(ROWS))
    else:
        path.write_text(content)
    out = tmp_path / "out"
    argv = ["--task", "sst2", "--model", str(models["bert"]), "--train-file", str(path), "--validation-file",
            str(data["validation"]), "--output-dir", str(out), "--report-to", "none", "--max-steps", "2"]  # fmt: skip
    check_error(capsys, run_main(main, argv), fragment)
    assert not out.exists()


OPTIONS = {  # train options on a tiny BERT -> the error's words
    "epochs nan": (["--epochs", "nan"], "--epochs must be a finite number, got nan"),
    "learning rate inf": (["--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
    "seed negative": (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    "seed too big": (["--seed", str(2**40)], "--seed must be between 0 and 4294967295"),
    "empty target module": (["--target-modules", ""], "--target-modules has an empty value"),
    "max length past positions": (["--max-length", "100000"], "longer than the 128 positions of this bert model"),
    "max steps negative": (["--max-steps", "-3"], "--max-steps must be greater than 0, got -3"),
    "lora dropout 1": (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
    "dataset and files": (["--dataset", "glue"], "--dataset glue and --train-file/--validation-file/--test-file both"),
    "output dir is a file": (["--output-dir", "{file}"], "exists and is not a directory"),
    "validation split 0": (["!data", "--validation-split", "0"], "--validation-split must be between 0 and 1"),
    "micro batch above batch": (["--batch-size", "4", "--micro-batch-size", "8"], "not a multiple"),
    "llrd decay 2": (["--method", "llrd", "--lr-decay", "2"], "--lr-decay must be in (0, 1], got 2.0"),
    "adapter size 0": (["--method", "adapter", "--adapter-size", "0"], "--adapter-size must be at least 1"),
    "deepspeed name": (["--deepspeed", "zero9"], "DeepSpeed config not found: zero9"),
    "config null option": (["--config", "{null_epochs}"], "key 'epochs' in"),
    "config a list": (["--config", "{list_yaml}"], "must be a mapping of option: value, got a list"),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_odd_options(case, models, data, tmp_path, capsys):
    from launch.train import main

    files = {"file": tmp_path / "a-file.txt", "null_epochs": tmp_path / "null.yaml", "list_yaml": tmp_path / "l.yaml"}
    files["file"].write_text("x")
    files["null_epochs"].write_text("task: sst2\nepochs:\n")  # YAML null for an option with a default
    files["list_yaml"].write_text("- task: sst2\n")
    args, fragment = OPTIONS[case]
    args = [a.format(**files) for a in args]
    out = tmp_path / "out"
    argv = ["--task", "sst2", "--model", str(models["bert"]), "--report-to", "none", "--max-steps", "2"]
    argv += ["--train-file", str(data["train"])] if "!data" in args else data_args(data, test=False)
    argv += [a for a in args if not a.startswith("!")]
    argv += [] if "--output-dir" in args else ["--output-dir", str(out)]
    check_error(capsys, run_main(main, argv), fragment)
    assert not out.exists()


DECODER = {  # sst2_t2t on a tiny decoder (Llama layout unless named) -> the error's words
    "template without the input": (["--prompt-template", "Review: nothing"], "holds none of the example's fields"),
    "gpt2 max length past positions": (["!gpt2", "--max-length", "4096"], "the 128 positions of this gpt2 model"),
    "virtual tokens past positions": (
        ["--method", "prompt_tuning", "--num-virtual-tokens", "100000"],
        "--num-virtual-tokens 100000 leaves no room for the input",
    ),
    "chat template path": (["--chat-template", "/no/such.jinja"], "invalid choice"),
    "t5 beams 0": (["!t5", "--num-beams", "0"], "--num-beams must be at least 1"),
}


@pytest.mark.parametrize("case", list(DECODER))
def test_odd_decoder_options(case, models, data, tmp_path, capsys):
    from launch.train import main

    args, fragment = DECODER[case]
    family = "gpt2" if "!gpt2" in args else "t5" if "!t5" in args else "llama"
    out = tmp_path / "out"
    argv = ["--task", "sst2_t2t", "--model", str(models[family]), *data_args(data, test=False), "--output-dir",
            str(out), "--report-to", "none", "--max-steps", "2", *(a for a in args if a[0] != "!")]  # fmt: skip
    check_error(capsys, run_main(main, argv), fragment)
    assert not out.exists()


WARNED = {  # legal, almost always a slip: trains, with one warning line
    "validation equal to train": (["--validation-file", "{train}"], "192 of 192 validation example(s) have a text"),
    "one text two labels": (["--train-file", "{conflict}"], "1 training text(s) appear with different labels"),
    "empty config": (["--config", "{empty}"], "is empty; every option has its default"),
    "warmup steps and ratio": (["--warmup-steps", "1", "--warmup-ratio", "0.2"], "both given; the steps win"),
    "learning rate 10": (["--learning-rate", "10", "--precision", "fp32"], "is far above fine-tuning rates"),
    "rotary past positions": (["!llama", "--max-length", "256"], "longer than the 128 positions this llama model"),
}


@pytest.mark.parametrize("case", list(WARNED))
def test_suspicious_inputs_train_with_one_warning(case, models, data, tmp_path, capsys):
    from launch.train import main

    conflict = tmp_path / "conflict.csv"
    conflict.write_text("sentence,label\n" + table(10) + "same text,1\nsame text,0\n")
    (tmp_path / "empty.yaml").write_text("")
    files = {"train": data["train"], "conflict": conflict, "empty": tmp_path / "empty.yaml"}
    args, fragment = WARNED[case]
    llama = "!llama" in args
    args = [a.format(**files) for a in args if not a.startswith("!")]
    out = tmp_path / "out"
    argv = ["--task", "sst2_t2t" if llama else "sst2", "--model", str(models["llama" if llama else "bert"]),
            "--train-file", str(data["train"]), "--validation-file", str(data["validation"]), *args,
            "--output-dir", str(out), "--report-to", "none", "--max-steps", "2", "--eval-strategy", "no",
            "--save-strategy", "no"]  # fmt: skip
    code = run_main(main, argv)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert code == 0 and (out / "run.json").is_file()
    assert len([w for w in warnings if fragment in w]) == 1, warnings


GRIDS = {  # a change to a valid grid file -> the error's words (checked before anything is written)
    "a list": ("- a\n", "grid file"),
    "a seed twice": ({"seeds": [1, 1]}, "`seeds:` lists a seed twice"),
    "no methods": ({"methods": []}, "`methods:` is empty"),
    "a negative seed": ({"seeds": [-1]}, "--seed must be between 0 and 4294967295, got -1"),
    "a nan setting": ({"settings": {"learning_rate": float("nan")}}, "'learning_rate' must be a finite number"),
    "a null setting": ({"settings": {"epochs": None}}, "'epochs' has no value"),
}


@pytest.mark.parametrize("case", list(GRIDS))
def test_odd_grid_files(case, models, data, tmp_path, capsys):
    from launch.studies import grid

    spec = write_grid(tmp_path / "g.yaml", models, data)
    change, fragment = GRIDS[case]
    if isinstance(change, str):
        spec.write_text(change)
    else:
        spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), **change}))
    check_error(capsys, run_main(grid.main, [str(spec), "--output-dir", str(tmp_path / "out")]), fragment)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def finished(models, data, tmp_path_factory) -> Path:
    from launch.train import main

    out = tmp_path_factory.mktemp("finished") / "run"
    main(["--task", "sst2", "--model", str(models["bert"]), *data_args(data, test=False), "--output-dir", str(out),
          "--report-to", "none", "--max-steps", "2", "--eval-strategy", "no", "--save-strategy", "no"])  # fmt: skip
    return out


@pytest.mark.integration  # trains the run it feeds odd input to
def test_odd_run_directory_commands(finished, tmp_path, capsys):
    from launch import evaluate, merge, predict

    run = Path(shutil.copytree(finished, tmp_path / "run"))
    texts = tmp_path / "texts.txt"
    texts.write_text("a fine film\na dull plot\n")  # no header line: its first line is read as the header
    check_error(capsys, run_main(predict.main, [str(run), "--data", str(texts)]), "add a header line")
    inputs = tmp_path / "in.csv"
    inputs.write_text("sentence\na fine film\n")
    check_error(capsys, run_main(predict.main, [str(run), "--data", str(inputs), "--output", str(tmp_path / "p.xml")]),
                "say the format by the name (.jsonl or .csv)")  # fmt: skip
    check_error(capsys, run_main(predict.main, [str(run / "run.json"), "--data", str(inputs)]), "is a file; give")
    check_error(capsys, run_main(evaluate.main, [str(run), "--data", str(tmp_path)]), "is not a file")
    kept = tmp_path / "merged"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    check_error(capsys, run_main(merge.main, [str(run), "--output", str(kept)]), "already exists and is not empty")
    assert (kept / "notes.txt").read_text() == "mine"
    (run / "run.json").write_text("{not json")
    check_error(capsys, run_main(evaluate.main, [str(run)]), "cannot read run record")
    assert not list(run.glob("eval*")) and not (run / "predict").exists() and not (tmp_path / "p.xml").exists()


@pytest.mark.integration  # trains the run it then stops the commands on
@pytest.mark.parametrize("command", ["evaluate", "merge"])
def test_sigterm_stops_a_command_in_one_line_leaving_nothing_half_written(finished, tmp_path, capsys, monkeypatch,
                                                                         command):  # fmt: skip
    """A real SIGTERM, sent by the process to itself while the command writes its result: exit 143, one line, no
    eval.json and no merged directory (nor its staging copy). Before, evaluate and predict died silently (-15), and
    a SIGTERM that reached the handler inside a library's `except Exception` was swallowed."""
    from launch import evaluate, merge
    from launch.run import rundir

    run = Path(shutil.copytree(finished, tmp_path / "run"))
    write = rundir.write_json  # eval.json, and the merge record inside its staging copy

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return write(*args, **kwargs)

    monkeypatch.setattr(rundir, "write_json", stopped)
    argv = [str(run)] if command == "evaluate" else [str(run), "--output", str(tmp_path / "merged")]
    code = run_main(evaluate.main if command == "evaluate" else merge.main, argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 143 and lines == ["terminated (SIGTERM); nothing half-written is left"], lines
    assert not list(run.glob("eval*")) and not list(tmp_path.glob("merged*"))
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler put back


LAUNCHER = {
    "port out of range": (["--num-processes", "2", "--main-process-port", "99999"], "must be a TCP port (1-65535)"),
    "rank past the machines": (
        ["--num-machines", "2", "--num-processes", "2", "--machine-rank", "2", "--main-process-ip", "127.0.0.1"],
        "--machine-rank 2 is not one of the 2 machine(s)",
    ),
}


@pytest.mark.parametrize("case", list(LAUNCHER))
def test_odd_launcher_options(case, models, data, tmp_path):
    args, fragment = LAUNCHER[case]
    out = tmp_path / "out"
    result = cli("ftctl", "train", *args, "--task", "sst2", "--model", str(models["bert"]), *data_args(data),
                 "--output-dir", str(out), "--max-steps", "1", "--report-to", "none")  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
    assert not out.exists()
