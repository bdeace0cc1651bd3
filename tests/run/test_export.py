"""`ftctl export`: a run as merged weights or an ONNX graph, with parity.json proving the export predicts what the
run does. ONNX Runtime is checked directly, in a process that never imports ftctl, against the run's own recorded
predictions; a broken export must fail the parity check (exit 1, the examples named)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import task_data
import torch
from conftest import FAST, cli, data_args, read_jsonl

from ftctl.errors import FtctlError

SHORT = [*FAST, "--max-steps", "12", "--learning-rate", "5e-3", "--eval-strategy", "no", "--save-strategy", "no"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, list[str]]:
    d = tmp_path_factory.mktemp("export-data")
    ner = [task_data.ner_jsonl(d / f"ner-{s}.jsonl", n, seed) for s, n, seed in (("t", 64, 1), ("v", 24, 2))]
    sts = [task_data.similarity(d / f"sts-{s}.tsv", n, seed) for s, n, seed in (("t", 64, 1), ("v", 24, 2))]
    qa = [task_data.squad_flat(d / f"qa-{s}.jsonl", n, seed) for s, n, seed in (("t", 48, 1), ("v", 16, 2))]
    return {
        "ner": ["--train-file", str(ner[0]), "--validation-file", str(ner[1])],
        "stsb": ["--train-file", str(sts[0]), "--validation-file", str(sts[1])],
        "squad": ["--train-file", str(qa[0]), "--validation-file", str(qa[1])],
    }


ORT_CHECK = Path(__file__).resolve().parents[2] / "bench" / "ort_check.py"  # ONNX Runtime and transformers only


def export(*args: str) -> dict:
    from launch.export import main

    return main(list(args))


def ort_agreement(export_dir: Path, predictions: Path) -> float:
    done = subprocess.run(
        [sys.executable, str(ORT_CHECK), str(export_dir), str(predictions)],
        capture_output=True,
        text=True,
        cwd=export_dir,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["examples"] > 10
    return result["agree"] / result["examples"]


@pytest.mark.parametrize(("task", "method"), [("sst2", "lora"), ("conll2003", "lora"), ("stsb", "full")])
def test_onnx_export_predicts_what_the_run_recorded(models, data, task_files, tmp_path, task, method):

    from launch.train import main as train

    files = data_args(data, test=False) if task == "sst2" else task_files["ner" if task == "conll2003" else "stsb"]
    run = tmp_path / "run"
    train(
        ["--task", task, "--method", method, "--model", str(models["bert"]), *files, *SHORT, "--output-dir", str(run)]
    )
    out = tmp_path / "onnx"
    record = export(str(run), "--format", "onnx", "--output", str(out))
    assert (out / "model.onnx").is_file() and (out / "config.json").is_file()
    saved = json.loads((out / "parity.json").read_text())
    assert saved["passed"] and saved["agreement"] >= 0.995 and record["agreement"] == saved["agreement"]
    assert saved["metric"]["interval"][0] <= 0 <= saved["metric"]["interval"][1]
    assert saved["largest_logit_difference"] < 1e-3 and saved["outputs"] == ["logits"]
    # ONNX Runtime alone, no ftctl: the run's own recorded predictions, with the label names from the export's config
    assert ort_agreement(out, run / "predictions.jsonl") >= 0.995
    if task == "sst2":
        labels = json.loads((out / "config.json").read_text())["id2label"]
        assert sorted(labels.values()) == sorted({r["label"] for r in read_jsonl(run / "predictions.jsonl")})


def test_a_broken_export_fails_its_parity_check_naming_the_examples(train, tmp_path, monkeypatch, capsys):
    """The export a forgotten merge or a mangled head would give: parity.json says so and the command exits 1."""
    from ftctl.errors import run_main
    from launch import export as export_command
    from launch.run import exporting

    run = train("--max-steps", "12", "--learning-rate", "5e-3", method="lora")
    standalone = exporting.standalone

    def mangled(*args, **kwargs):
        model, notes = standalone(*args, **kwargs)
        with torch.no_grad():
            head = model.classifier.weight
            head.copy_(torch.randn_like(head) * 3)
        return model, notes

    monkeypatch.setattr(exporting, "standalone", mangled)
    out = tmp_path / "broken"
    capsys.readouterr()
    assert run_main(export_command.main, [str(run), "--format", "onnx", "--output", str(out)]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("parity failed: the onnx export disagrees with the trained run on ") and "#" in line
    saved = json.loads((out / "parity.json").read_text())
    assert not saved["passed"] and saved["disagreements"] and saved["largest_logit_difference"] > 0.1
    assert f"{len(saved['disagreements'])} of {saved['examples']} examples" in line
    # a looser threshold accepts the same export
    assert (
        run_main(
            export_command.main,
            [str(run), "--format", "onnx", "--output", str(out), "--overwrite", "--max-disagreement", "100"],
        )
        == 0
    )


def test_decoder_lora_merged_export_generates_what_the_adapter_does(models, data, tmp_path):
    """A tiny Llama LoRA run (labels generated as words): the merged export's greedy generations equal the adapter's,
    on the run's examples (parity.json) and on fixed prompts, in plain transformers + PEFT."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch.train import main as train

    run = tmp_path / "run"
    train(
        [
            "--task",
            "sst2_t2t",
            "--method",
            "lora",
            "--model",
            str(models["llama"]),
            *data_args(data, test=False),
            *SHORT,
            "--learning-rate",
            "2e-2",
            "--max-new-tokens",
            "3",
            "--output-dir",
            str(run),
        ]
    )
    out = tmp_path / "merged"
    record = export(str(run), "--format", "merged", "--output", str(out))
    assert record["passed"] and record["agreement"] == 1.0 and record["metric"]["metric"] == "accuracy"
    assert json.loads((out / "export.json").read_text())["format"] == "merged"

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = ["a good film", "the plot was awful and dull", "lovely music", "boring story"]
    adapter = AutoPeftModelForCausalLM.from_pretrained(run).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            a = adapter.generate(**ids, max_new_tokens=5, do_sample=False)
            b = merged.generate(**ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(a, b), prompt


def test_exports_the_model_cannot_take_are_refused_before_anything_is_written(train, tmp_path, monkeypatch):
    run = train("--max-steps", "2", method="lora")
    out = tmp_path / "out"
    with pytest.raises(FtctlError, match="--format gguf: llama.cpp runs decoder language models; task 'sst2'"):
        export(str(run), "--format", "gguf", "--output", str(out))
    with pytest.raises(FtctlError, match="--max-disagreement is a percent of examples, from 0 to 100; got 150"):
        export(str(run), "--format", "onnx", "--output", str(out), "--max-disagreement", "150")
    prompt = train("--max-steps", "2", method="prompt_tuning", name="prompt")
    with pytest.raises(FtctlError, match="--format onnx: method 'prompt_tuning' is not weights that fold"):
        export(str(prompt), "--format", "onnx", "--output", str(out))
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FtctlError, match="already exists and is not empty"):
        export(str(run), "--format", "onnx", "--output", str(out))
    with pytest.raises(FtctlError, match="does not hold an earlier export"):
        export(str(run), "--format", "onnx", "--output", str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert not list(tmp_path.glob("*.export.*"))


def test_generation_and_gguf_refusals(models, data, tmp_path, monkeypatch):

    from launch.train import main as train

    run = tmp_path / "run"
    train(
        [
            "--task",
            "sst2_t2t",
            "--method",
            "lora",
            "--model",
            str(models["llama"]),
            *data_args(data, test=False),
            *FAST,
            "--max-steps",
            "1",
            "--output-dir",
            str(run),
        ]
    )
    out = tmp_path / "out"
    with pytest.raises(FtctlError, match="--format onnx: task 'sst2_t2t' generates text"):
        export(str(run), "--format", "onnx", "--output", str(out))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("FTCTL_GGUF_CONVERTER", raising=False)
    with pytest.raises(
        FtctlError, match="--format gguf uses llama.cpp's own converter and no convert_hf_to_gguf.py on"
    ):
        export(str(run), "--format", "gguf", "--output", str(out))
    monkeypatch.setenv("FTCTL_GGUF_CONVERTER", str(tmp_path / "nowhere.py"))
    with pytest.raises(FtctlError, match="FTCTL_GGUF_CONVERTER=.*nowhere.py is not a file"):
        export(str(run), "--format", "gguf", "--output", str(out))
    assert not out.exists()


def test_export_command_line(tmp_path):

    result = cli("ftctl", "export", str(tmp_path / "nowhere"), "--format", "onnx", "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: run directory not found: {tmp_path / 'nowhere'}"
    result = cli("ftctl", "export", "--help")
    assert (
        result.returncode == 0 and "--max-disagreement PERCENT" in result.stdout and "merged,onnx,gguf" in result.stdout
    )
