"""Decoder LLMs the way their users run them, end to end on a tiny Llama-3-style instruct model with its chat
template: classification by generation trained with LoRA and scored zero-shot, few-shot and fine-tuned side by
side; the same flow for summarization, translation and instruction tuning; `ftctl predict` and `ftctl generate`
reproducing `ftctl evaluate` on classification (encoder and decoder), NER, QA and summarization runs; and the bad
inputs of prompts, baselines and inference refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import chat_models
import pytest
import task_data
from conftest import cli, read_jsonl
from test_bad_input import check_error

from ftctl.errors import FtctlError, run_main

FAST = ["--epochs", "2", "--batch-size", "8", "--learning-rate", "5e-3", "--report-to", "none", "--no-plan",
        "--save-strategy", "no", "--eval-strategy", "no"]  # fmt: skip


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    return chat_models.save_chat_model("llama3", tmp_path_factory.mktemp("llama3") / "model")


@pytest.fixture(scope="module")
def files(tmp_path_factory, data) -> dict:
    d = tmp_path_factory.mktemp("llm-data")
    return {
        "sst2": ["--train-file", str(data["train"]), "--validation-file", str(data["validation"]),
                 "--max-train-samples", "48", "--max-eval-samples", "12"],
        "summarization": ["--train-file", str(task_data.summaries(d / "s.jsonl", 24, 1)),
                          "--validation-file", str(task_data.summaries(d / "sv.jsonl", 6, 2))],
        "translation": ["--train-file", str(task_data.translations(d / "t.jsonl", 24, 1)),
                        "--validation-file", str(task_data.translations(d / "tv.jsonl", 6, 2))],
        "instruction": ["--train-file", str(task_data.instructions(d / "i.json", 24, 1)),
                        "--validation-file", str(task_data.instructions(d / "iv.json", 6, 2))],
        "ner": ["--train-file", str(task_data.conll(d / "n.txt", 32, 1)),
                "--validation-file", str(task_data.conll(d / "nv.txt", 8, 2))],
        "squad": ["--train-file", str(task_data.squad_nested(d / "q.json", 24, 1)),
                  "--validation-file", str(task_data.squad_nested(d / "qv.json", 6, 2)),
                  "--max-length", "64", "--doc-stride", "16"],
    }  # fmt: skip


def train_run(out: Path, task: str, model: Path, data: list[str], *extra: str, method: str = "lora") -> Path:
    from launch.train import main

    main(["--task", task, "--method", method, "--model", str(model), *data, "--output-dir", str(out), *FAST, *extra])
    return out


def test_classification_by_generation_zero_shot_few_shot_and_fine_tuned(llama3, files, tmp_path, capsys):
    from launch.evaluate import main as evaluate

    run = train_run(tmp_path / "sst2", "sst2_t2t", llama3, files["sst2"], "--max-new-tokens", "3")
    record = json.loads((run / "run.json").read_text())
    prompt = record["task"]["prompt"]
    assert prompt["mode"] == "chat" and prompt["end_of_answer"] == "<|eot_id|>"
    assert prompt["first_example"]["prompt"].startswith("<|begin_of_text|><|start_header_id|>user")
    assert "Answer with one of: negative, positive." in prompt["first_example"]["prompt"]
    assert "## Prompt" in (run / "README.md").read_text()
    assert "prompt (chat; the answer ends with <|eot_id|>)" in capsys.readouterr().out  # printed as the run starts

    result = evaluate([str(run), "--baseline", "--few-shot", "4"])
    printed = capsys.readouterr().out
    assert all(column in printed for column in ("zero-shot", "4-shot", "fine-tuned"))
    on_disk = json.loads((run / "eval.json").read_text())
    assert on_disk["baseline_kind"].startswith("zero-shot") and on_disk["few_shot"]["k"] == 4
    for scores in (on_disk, on_disk["baseline"], on_disk["few_shot"]["metrics"]):
        assert {"accuracy", "f1", "generation_accuracy", "invalid"} <= set(scores)
    rows = read_jsonl(run / "eval_predictions.jsonl")
    assert all(r["prediction"] in ("negative", "positive") for r in rows)  # constrained: always a label
    assert result["accuracy"] == sum(r["correct"] for r in rows) / len(rows)
    shots = read_jsonl(run / "eval_few_shot_predictions.jsonl")
    assert shots[0]["prompt"].count("<|start_header_id|>assistant") == 5  # 4 answered examples and the query


@pytest.mark.parametrize("task", ["summarization", "translation", "instruction"])
def test_the_same_flow_for_generative_tasks(llama3, files, tmp_path, task):
    from launch.evaluate import main as evaluate

    extra = ["--max-new-tokens", "4"] + (
        ["--source-lang", "en", "--target-lang", "ro"] if task == "translation" else []
    )
    run = train_run(tmp_path / task, task, llama3, files[task], *extra)
    result = evaluate([str(run), "--baseline", "--few-shot", "2"])
    assert result["baseline_kind"].startswith("zero-shot") and result["few_shot"]["k"] == 2
    metric = {"summarization": "rougeL", "translation": "bleu", "instruction": "perplexity"}[task]
    assert metric in result and metric in result["baseline"] and metric in result["few_shot"]["metrics"]


def test_a_head_baseline_is_labelled_as_an_untrained_head(train, tmp_path):
    from launch.evaluate import main as evaluate

    result = evaluate([str(train("--max-steps", "2", name="head")), "--baseline"])
    assert result["baseline_kind"].startswith("untrained head")


def same_predictions(predicted: list[dict], evaluated: list[dict], gold: tuple[str, ...]) -> None:
    assert len(predicted) == len(evaluated)
    for p, e in zip(predicted, evaluated, strict=True):
        assert p == {k: v for k, v in e.items() if k not in gold}


@pytest.mark.parametrize(
    "name,task,family,source,gold",
    [
        ("sst2-bert", "sst2", "bert", "sst2", ("label", "correct")),
        ("sst2-llama3-t2t", "sst2_t2t", "llama3", "sst2", ("label", "correct", "generated_correct")),
        ("ner", "ner", "bert", "ner", ("tags", "correct")),
        ("squad", "squad", "bert", "squad", ("answers", "exact_match", "f1")),
        ("summarization-llama3", "summarization", "llama3", "summarization", ("reference",)),
    ],
)
def test_predict_reproduces_evaluate(models, llama3, files, tmp_path, name, task, family, source, gold):
    from launch.evaluate import main as evaluate
    from launch.predict import main as predict

    model = llama3 if family == "llama3" else models[family]
    generative = ["--max-new-tokens", "4"] if task in ("sst2_t2t", "summarization") else []
    run = train_run(tmp_path / name, task, model, files[source], *generative, "--max-steps", "4")
    evaluate([str(run), "--data", files[source][files[source].index("--validation-file") + 1]])
    data = files[source][files[source].index("--validation-file") + 1]
    rows = predict([str(run), "--data", data])
    same_predictions(rows, read_jsonl(run / "eval_predictions.jsonl"), gold)
    assert read_jsonl(run / "predict" / f"{Path(data).stem}.jsonl") == rows
    csv_out = tmp_path / "out.csv"
    predict([str(run), "--data", data, "--output", str(csv_out)])
    header = csv_out.read_text().splitlines()[0].split(",")
    assert "prediction" in header and not set(gold) & set(header)
    if task == "summarization":  # generate: the same text as predict for the same document
        from launch.predict import generate

        first = json.loads(Path(data).read_text().splitlines()[0])
        generated = generate([str(run), "--prompt", first["document"]])
        assert generated[0]["prediction"] == rows[0]["prediction"]
        import io
        import sys

        sys.stdin = io.StringIO(first["document"] + "\n\n")  # `-`: one prompt per line of stdin, blank lines skipped
        try:
            assert [r["prediction"] for r in generate([str(run), "--prompt", "-"])] == [rows[0]["prediction"]]
        finally:
            sys.stdin = sys.__stdin__


def test_predict_accepts_inputs_without_answers(train, data, tmp_path):
    from launch.predict import main as predict

    run = train("--max-steps", "2", name="nolabels")
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in ("a lovely film", "a dull plot")))
    rows = predict([str(run), "--data", str(inputs)])
    assert [r["text"] for r in rows] == ["a lovely film", "a dull plot"]
    assert all(set(r["probabilities"]) == {"negative", "positive"} and "label" not in r for r in rows)


def test_bad_inputs_of_prompts_baselines_and_inference(models, llama3, files, train, tmp_path, capsys):
    from launch.evaluate import main as evaluate
    from launch.predict import generate
    from launch.predict import main as predict
    from launch.train import main as train_main

    head_run = train("--max-steps", "2", name="headrun")
    cases = [
        (evaluate, [str(head_run), "--few-shot", "2"], "--few-shot: task 'sst2' predicts with a new head"),
        (generate, [str(head_run), "--prompt", "hello"], "task 'sst2' does not generate text"),
        (predict, [str(tmp_path / "nope"), "--data", "x.jsonl"], "run directory not found"),
    ]
    half = tmp_path / "half"
    half.mkdir()
    (half / "spec.json").write_text("{}")
    cases.append((predict, [str(half), "--data", "x.jsonl"], "did not finish (no run.json)"))
    for main, argv, fragment in cases:
        check_error(capsys, run_main(main, argv), fragment)
    t2t = train_run(tmp_path / "t2t", "sst2_t2t", llama3, files["sst2"], "--max-steps", "1")
    check_error(capsys, run_main(evaluate, [str(t2t), "--few-shot", "500"]), "--few-shot 500: the training data has")
    base = ["--model", str(llama3), *files["summarization"], "--output-dir", str(tmp_path / "x"), *FAST]
    for extra, fragment in (
        (["--task", "summarization", "--prompt-template", "{article}"], "no field '{article}'; fields: {instruction}"),
        (["--task", "summarization", "--model", str(models["gpt2"]), "--chat-template", "on"], "--chat-template on"),
    ):
        check_error(capsys, run_main(train_main, [*base, *extra]), fragment)
        assert not (tmp_path / "x").exists()
    for labels, fragment in (
        ([" ", "pos"], "row 1 has no label in column 'label'"),  # empty once spaces are dropped
        (["Pos", "pos "], "labels 'Pos' and 'pos' are the same word once case and spaces are dropped"),
    ):
        path = tmp_path / "labels.jsonl"
        path.write_text("".join(json.dumps({"text": f"t{i}", "label": labels[i % 2]}) + "\n" for i in range(8)))
        argv = ["--task", "classification_t2t", "--model", str(llama3), "--train-file", str(path), "--output-dir",
                str(tmp_path / "y"), *FAST]  # fmt: skip
        check_error(capsys, run_main(train_main, argv), fragment)
        assert not (tmp_path / "y").exists()
    with pytest.raises(FtctlError, match="no field"):
        train_run(tmp_path / "z", "translation", llama3, files["translation"], "--prompt-template", "{document}")


def test_the_cli_verbs(train, tmp_path):
    run = train("--max-steps", "2", name="cli")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"sentence": "a lovely film"}) + "\n")
    result = cli("ftctl", "predict", str(run), "--data", str(inputs), "--output", str(tmp_path / "p.jsonl"))
    assert result.returncode == 0, result.stderr
    assert read_jsonl(tmp_path / "p.jsonl")[0]["prediction"] in ("negative", "positive")
    again = cli("ftctl", "predict", str(run), "--data", str(inputs), "--output", str(tmp_path / "p.jsonl"))
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    assert cli("ftctl", "generate", "--help").returncode == 0


def test_a_grid_scores_zero_and_few_shot_baselines_and_the_report_shows_them(llama3, files, tmp_path):
    import yaml

    from launch.studies import grid, report

    spec = tmp_path / "g.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "llm", "models": {"llama3": str(llama3)},
        "tasks": {"sst2_t2t": dict(zip(("train_file", "validation_file"), files["sst2"][1:4:2], strict=True))},
        "methods": ["lora"], "baseline": {"zero_shot": True, "few_shot": 2},
        "settings": {"max_steps": 2, "batch_size": 8, "report_to": "none", "max_eval_samples": 8},
    }))  # fmt: skip
    state = grid.main([str(spec), "--output-dir", str(tmp_path / "grid")])
    scored = json.loads((tmp_path / "grid" / state["cells"][0]["id"] / "eval.json").read_text())
    assert scored["baseline_kind"].startswith("zero-shot") and scored["few_shot"]["k"] == 2
    built = report.build([str(tmp_path / "grid")], tmp_path / "report")
    group = built["tasks"][0]["groups"][0]
    assert group["few_shot"]["accuracy"] == scored["few_shot"]["metrics"]["accuracy"]
    assert "| accuracy 2-shot |" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(FtctlError, match="`baseline:` must be true, false or a mapping"):
        spec.write_text(spec.read_text().replace("few_shot: 2", "few_shot: many"))
        grid.main([str(spec), "--output-dir", str(tmp_path / "other")])
