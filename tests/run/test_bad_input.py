"""Bad input: one clear `error:` line on stderr, exit code 2, no traceback, nothing written.

Runs the real console entry (`run_main` around `launch.train.main` / `launch.evaluate.main`) in-process; a few
cases also run as subprocesses in test_cli.py to check the process-level behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import data_args

from ftctl.errors import run_main


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def bad(tmp_path, data):
    d = tmp_path / "bad"
    d.mkdir()
    rows = "\n".join(json.dumps({"text": f"t {i}", "label": i % 2}) for i in range(10))
    return {
        "empty": write(d / "empty.csv", ""),
        "header_only": write(d / "header.csv", "sentence,label\n"),
        "bad_json": write(d / "bad.json", '[{"sentence": "a", "label": 1},'),
        "xlsx": write(d / "data.xlsx", "not really"),
        "other_columns": write(d / "cols.jsonl", rows + "\n"),
        "one_class": write(d / "one.csv", "sentence,label\n" + "".join(f"s {i},pos\n" for i in range(10))),
        "float_labels": write(d / "float.csv", "sentence,label\n" + "".join(f"s {i},{i / 7:.3f}\n" for i in range(10))),
        "missing_label": write(d / "missing.csv", "sentence,label\na,1\nb,\nc,0\n"),
        "new_labels": write(d / "new.csv", "sentence,label\n" + "".join(f"s {i},{i % 3}\n" for i in range(10))),
        "no_delimiter": write(d / "plain.txt", "justtext\nmore\n"),
        "out_of_range": write(d / "range.csv", "sentence,label\n" + "a,0\nb,1\nc,5\n" * 3),
        "yaml_unknown": write(d / "unknown.yaml", "task: sst2\nlearning_rat: 0.1\n"),
        "yaml_type": write(d / "type.yaml", "task: sst2\nepochs: three\n"),
        "yaml_syntax": write(d / "syntax.yaml", "task: [sst2\n"),
        "not_a_model": d,
        "good_train": data["train"],
    }


def check_error(capsys, code: int, fragment: str) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, f"expected one line, got: {captured.err}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert fragment in lines[0], lines[0]
    return lines[0]


TRAIN_CASES = {
    "unknown task": (["--task", "sst3"], "unknown task 'sst3' (did you mean 'sst2'?)"),
    "unknown preset": (["--task", "imbd"], "unknown task 'imbd' (did you mean 'imdb'?)"),
    "unknown method": (["--method", "lorra"], "unknown method 'lorra' (did you mean 'lora'?)"),
    "task the architecture cannot do": (["--task", "sst2_t2t"], "does not support encoder models like 'bert'"),
    "no task": (["!no-task"], "no task given"),
    "missing model": (["--model", "/no/such/model"], "model path not found: /no/such/model"),
    "not a model dir": (["--model", "{not_a_model}"], "is not a model directory"),
    "missing data file": (["--train-file", "/no/such.csv"], "train file not found: /no/such.csv"),
    "empty data file": (["--train-file", "{empty}"], "train file is empty"),
    "header only": (["--train-file", "{header_only}"], "has a header but no rows"),
    "unparseable json": (["--train-file", "{bad_json}"], "is not valid JSON"),
    "unsupported type": (["--train-file", "{xlsx}"], "unsupported type '.xlsx'"),
    "missing text column": (
        ["--train-file", "{other_columns}"],
        "has no column 'sentence'; columns found: text, label",
    ),
    "missing label column": (
        ["--train-file", "{other_columns}", "--text-column", "text", "--label-column", "stars"],
        "has no column 'stars'; columns found: text, label",
    ),
    "single class": (["--train-file", "{one_class}"], "has a single class ('pos')"),
    "labels out of range": (
        ["--train-file", "{out_of_range}"],
        "train data has label(s) 5 outside the 2 classes of task 'sst2' (0..1: negative, positive)",
    ),
    "non-integer labels": (["--train-file", "{float_labels}"], "non-integer numbers"),
    "missing label value": (["--train-file", "{missing_label}"], "row 2 has no label"),
    "unseen validation labels": (
        ["!data", "--train-file", "{good_train}", "--validation-file", "{new_labels}"],
        "validation data has label(s) 2 that the model was not trained on",
    ),
    "unknown flag": (["--lora-rr", "4"], "unknown option --lora-rr (did you mean '--lora-r'?)"),
    "wrong value type": (["--epochs", "abc"], "--epochs must be a number, got 'abc'"),
    "option of another method": (["--method", "full", "--lora-r", "4"], "--lora-r does not apply"),
    "yaml unknown key": (["--config", "{yaml_unknown}"], "unknown key 'learning_rat'"),
    "yaml unknown key suggestion": (["--config", "{yaml_unknown}"], "(did you mean 'learning_rate'?)"),
    "yaml wrong type": (["--config", "{yaml_type}"], "key 'epochs' in"),
    "yaml syntax": (["--config", "{yaml_syntax}"], "is not valid YAML"),
    "missing yaml": (["--config", "/no/such.yaml"], "config file not found"),
    "validation without train": (["!data", "--validation-file", "{other_columns}"], "without --train-file"),
    "fp16 on cpu": (["--precision", "fp16"], "needs a CUDA GPU"),
    "batch geometry": (["--batch-size", "10", "--micro-batch-size", "3"], "not a multiple"),
    "unknown best metric": (["--metric-for-best-model", "bleu"], "not reported by task"),
    "freeze too many": (["--method", "freeze", "--freeze-layers", "5"], "cannot freeze 5"),
    "lora target missing": (["--target-modules", "q_proj"], "not found in this bert model"),
    "freeze encoder on encoder": (["--method", "freeze", "--freeze-encoder"], "needs an encoder-decoder"),
    "resume nothing": (["--resume"], "no checkpoint"),
    "negative learning rate": (["--learning-rate", "-1"], "--learning-rate must be greater than 0"),
    "three text columns": (["--text-column", "a", "b", "c"], "at most two"),
    # a header without a separator is a one-column table (a file of texts): here it lacks the text column
    "one column": (["--train-file", "{no_delimiter}"], "train data has no column 'sentence'; columns found: justtext"),
    "eval steps missing": (["--eval-strategy", "steps"], "needs --eval-steps"),
    "save/eval mismatch": (["--save-strategy", "no"], "needs --save-strategy equal to --eval-strategy"),
    "bad choice": (["--lr-scheduler", "cosin"], "invalid choice"),
    "overwrite and resume": (["--overwrite", "--resume"], "contradict"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input(case, models, data, bad, tmp_path, capsys):
    from launch.train import main

    args, fragment = TRAIN_CASES[case]
    args = [a.format(**bad) for a in args]
    out = tmp_path / "out"
    argv = [] if "!no-task" in args else ["--task", "sst2"]
    if "!data" not in args and not any(a == "--train-file" for a in args):
        argv += data_args(data)
    argv += ["--model", str(models["bert"])] if "--model" not in args else []
    argv += [a for a in args if not a.startswith("!")] + ["--output-dir", str(out), "--report-to", "none"]
    code = run_main(main, argv)
    check_error(capsys, code, fragment)
    assert not out.exists(), "nothing may be written on bad input"


def test_existing_output_dir_is_refused_and_untouched(models, data, tmp_path, capsys):
    from launch.train import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = run_main(
        main, ["--task", "sst2", "--model", str(models["bert"]), *data_args(data), "--output-dir", str(out)]
    )
    check_error(capsys, code, "already exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    code = run_main(
        main,
        ["--task", "sst2", "--model", str(models["bert"]), *data_args(data), "--output-dir", str(out), "--overwrite"],
    )
    check_error(capsys, code, "is not an ftctl run directory")
    assert (out / "keep.txt").read_text() == "precious"


def test_output_dir_that_cannot_be_written(models, data, tmp_path, capsys, monkeypatch):
    """Refused before anything is written. A chmod-ed directory stops no one running as root, so a read-only
    directory is checked for real only as another user; as root, os.access is told what the kernel would say."""
    import os

    from launch.train import main

    base = ["--task", "sst2", "--model", str(models["bert"]), *data_args(data), "--report-to", "none"]
    blocker = write(tmp_path / "blocker", "a file")
    check_error(capsys, run_main(main, [*base, "--output-dir", str(blocker / "runs" / "out")]), "is a file, not a dir")
    check_error(capsys, run_main(main, [*base, "--output-dir", str(blocker)]), "exists and is not a directory")
    assert blocker.read_text() == "a file"

    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and Path(p) != locked)
    else:
        locked.chmod(0o555)
    try:
        code = run_main(main, [*base, "--output-dir", str(locked / "out")])
    finally:
        locked.chmod(0o755)
    check_error(capsys, code, f"{locked} is not writable")
    assert not any(locked.iterdir())


def test_launch_asking_for_more_processes_than_allowed(data, tmp_path, capsys, monkeypatch):
    """`ftctl train` launcher settings that accelerate would run as one process, or fail on, are refused before the
    launch; here a run on this machine would train in this process, so the refusal comes from the launcher."""
    from launch.cli import _train
    from launch.run import launcher

    out = tmp_path / "out"
    base = ["--task", "sst2", *data_args(data), "--output-dir", str(out), "--report-to", "none"]
    two_gpus = write(tmp_path / "two_gpus.yaml", "distributed_type: MULTI_GPU\nnum_processes: 4\ngpu_ids: 0,1\n")
    bare_no = write(tmp_path / "bare_no.yaml", "distributed_type: NO\nnum_processes: 1\n")
    cases = [
        (["--accelerate-config", "single_gpu", "--num-processes", "2"], "runs a single process (distributed_type: NO)"),
        (["--accelerate-config", str(bare_no), "--num-processes", "2"], "runs a single process"),
        (["--accelerate-config", str(two_gpus)], "lists 2 GPU(s) in gpu_ids (0,1) but asks for 4 processes"),
        (["--num-processes", "0"], "--num-processes must be at least 1, got 0"),
        (["--accelerate-config", "multi_gpu"], "this machine has 1 GPU(s)"),  # 8 processes
        (["--num-processes", "2"], "this machine has 1 GPU(s)"),
    ]
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 1)
    for args, fragment in cases:
        check_error(capsys, run_main(_train, [*args, *base]), fragment)
        assert not out.exists()
    monkeypatch.setattr(launcher, "visible_gpus", lambda: 0)  # CPU processes: as many as asked for
    command = launcher.build_command(launcher.split(["--num-processes", "2", *base])[0], base)
    assert "--num_processes 2" in " ".join(command)


def test_qlora_without_usable_bitsandbytes(models, data, tmp_path, capsys, monkeypatch):
    import sys

    from launch.train import main
    from methods._qlora import bnb_problem

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails as when not installed
    bnb_problem.cache_clear()
    out = tmp_path / "out"
    try:
        code = run_main(
            main,
            [
                "--task",
                "sst2",
                "--method",
                "qlora",
                "--model",
                str(models["llama"]),
                *data_args(data),
                "--output-dir",
                str(out),
                "--report-to",
                "none",
            ],
        )
    finally:
        bnb_problem.cache_clear()
    line = check_error(capsys, code, "method 'qlora' needs bitsandbytes 4-bit layers")
    assert "bitsandbytes cannot be imported" in line and "use lora" in line
    assert not out.exists()


@pytest.mark.integration  # trains the run it then feeds bad input
def test_evaluate_bad_input(tmp_path, capsys, train, data):
    from launch.evaluate import main

    check_error(capsys, run_main(main, [str(tmp_path / "nope")]), "run directory not found")
    check_error(capsys, run_main(main, [str(tmp_path)]), "is not an ftctl run directory")
    run_dir = train("--epochs", "1", "--eval-strategy", "no", "--save-strategy", "no", "--no-eval-on-start")
    check_error(
        capsys, run_main(main, [str(run_dir), "--data", str(tmp_path / "none.csv")]), "evaluation data not found"
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("sentence,label\na,0\nb,7\n")
    line = check_error(capsys, run_main(main, [str(run_dir), "--data", str(labels)]), "not trained on")
    assert line.startswith("error: evaluation data has label(s) 7")  # not "data data"
    check_error(capsys, run_main(main, [str(run_dir), "--batch-size", "0"]), "--batch-size must be greater than 0")
    weights = run_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    check_error(capsys, run_main(main, [str(run_dir)]), "is damaged or truncated")
    weights.unlink()
    check_error(capsys, run_main(main, [str(run_dir)]), "has no adapter_model.safetensors")
    assert not (run_dir / "eval.json").exists()
