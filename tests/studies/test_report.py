"""`ftctl report` on run directories written here: the numbers in report.json and report.md are the runs' own, the
plots are real PNG images, and bad input is refused without writing anything."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import cli

from ftctl.errors import FtctlError
from launch.studies import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_run(
    path: Path,
    *,
    task: str,
    kind: str,
    method: str,
    after: dict,
    baseline: dict | None = None,
    details: dict | None = None,
    evaluated: bool = True,
    after_rows: list[dict] | None = None,
    before_rows: list[dict] | None = None,
    seed: int = 42,
    trainable: int = 1234,
    total: int = 100_000,
) -> Path:
    """A finished run directory as `ftctl train` + `ftctl evaluate [--baseline]` leave it (the files the report
    reads), with numbers chosen so that any rounding on the way would show."""
    path.mkdir(parents=True)
    steps = range(1, 41, 4)
    _write(
        path / "run.json",
        {
            "status": "completed",
            "config": {"task": task, "method": method, "model": "org/tiny-model", "seed": seed},
            "task": {"name": task, "preset": task, "kind": kind},
            "method": {"name": method, "peft": method != "full"},
            "model": {"name_or_path": "org/tiny-model", "display": "org/tiny-model", "hub_id": None},
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / total,
            "reduction_percent": 100 * (1 - trainable / total),
            "saved_weights": {"files": ["adapter_model.safetensors"], "bytes": 123457, "mb": 123457 / 2**20},
            "train_runtime_s": 12.345678901,
            "samples_per_second": 0.1 + 0.2,
            "tokens_per_second": 1000 / 3,
            "peak_memory_mb": 611.37109375,
            "device_hours": 12.345678901 * 2 / 3600,  # two processes
            "plan": {"error": {"peak_memory": -0.0421, "train_time": 1.5}},
            "history": [{"loss": 1.0 / s, "step": s, "epoch": s / 40} for s in steps]
            + [{"eval_loss": 0.9 - 0.01 * s, "step": s, "epoch": s / 40} for s in (0, 20, 40)],
            "metrics": {k: v - 0.01 for k, v in after.items()},
            "metric_details": details or {},
            "test_metrics": None,
        },
    )
    if evaluated:
        scored = {
            **after,
            "details": details or {},
            "info": {"base_model": "org/tiny-model", "data": f"{task}-dev.jsonl", "examples": 50},
        }
        if baseline is not None:
            scored["baseline"] = {**baseline, "details": {}}
        _write(path / "eval.json", scored)
        if after_rows is not None:
            _jsonl(path / "eval_predictions.jsonl", after_rows)
        if before_rows is not None:
            _jsonl(path / "eval_baseline_predictions.jsonl", before_rows)
    return path


def confusion(labels: list[str], seed: int) -> dict:
    rng = random.Random(seed)
    return {"labels": labels, "matrix": [[rng.randint(0, 30) for _ in labels] for _ in labels]}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Two classification runs sharing one baseline, two NER runs, two generative runs with per-example scores
    (one in the predictions' fields, one computed from the texts), and a run that was never evaluated."""
    root = tmp_path / "runs"
    labels = ["negative", "positive"]
    make_run(
        root / "sst2-lora",
        task="sst2",
        kind="classification",
        method="lora",
        after={"loss": 0.41923931, "accuracy": 0.816, "f1": 0.8131266351419425},
        baseline={"loss": 0.6931, "accuracy": 0.464, "f1": 0.31693989071038253},
        details={"confusion_matrix": confusion(labels, 1)},
    )
    make_run(
        root / "sst2-full",
        task="sst2",
        kind="classification",
        method="full",
        trainable=100_000,
        after={"loss": 0.3333333333333333, "accuracy": 0.858, "f1": 0.8571428571428571},
        details={"confusion_matrix": confusion(labels, 2)},
    )
    make_run(
        root / "sst2-head",
        task="sst2",
        kind="classification",
        method="head",
        evaluated=False,
        after={"loss": 0.55, "accuracy": 0.7, "f1": 0.69},
    )
    entities = {
        "LOC": {"precision": 0.8, "recall": 0.7, "f1": 0.7466666666666667, "support": 10},
        "PER": {"precision": 0.9, "recall": 0.95, "f1": 0.9243243243243243, "support": 12},
    }
    make_run(
        root / "ner-lora",
        task="conll2003",
        kind="tokens",
        method="lora",
        after={"precision": 0.81, "recall": 0.79, "f1": 0.7998765432098765, "accuracy": 0.95},
        baseline={"precision": 0.01, "recall": 0.02, "f1": 0.013333333333333334, "accuracy": 0.3},
        details={"per_entity": entities},
    )
    make_run(
        root / "ner-head",
        task="conll2003",
        kind="tokens",
        method="head",
        after={"precision": 0.5, "recall": 0.4, "f1": 0.4444444444444444, "accuracy": 0.8},
    )  # no details
    rng = random.Random(0)
    fields_after = [
        {"index": i, "prediction": "x", "reference": "y", "rougeL": rng.random(), "rouge1": rng.random()}
        for i in range(40)
    ]
    fields_before = [
        {"index": i, "prediction": "x", "reference": "y", "rougeL": rng.random() / 3, "rouge1": rng.random() / 3}
        for i in range(40)
    ]
    make_run(
        root / "sum-lora",
        task="summarization",
        kind="generation",
        method="lora",
        after={"rouge1": 0.41, "rouge2": 0.2, "rougeL": 0.38, "rougeLsum": 0.39},
        baseline={"rouge1": 0.11, "rouge2": 0.02, "rougeL": 0.09, "rougeLsum": 0.1},
        after_rows=fields_after,
        before_rows=fields_before,
    )
    words = "the cat sat on a mat with another small dog near its red house".split()
    texts = [" ".join(rng.sample(words, 6)) for _ in range(30)]
    make_run(
        root / "sum-full",
        task="summarization",
        kind="generation",
        method="full",
        after={"rouge1": 0.45, "rouge2": 0.22, "rougeL": 0.4, "rougeLsum": 0.41},
        after_rows=[{"index": i, "prediction": t, "reference": texts[(i + 1) % 30]} for i, t in enumerate(texts)],
    )
    return root


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    """A real PNG that matplotlib wrote: the signature, a sensible size, and pixels that are not all one colour."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, (path, len(data))
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 150 and image.shape[1] >= 200, image.shape
    assert image[..., :3].std() > 0.05, f"{path} looks blank"


def test_report_numbers_equal_the_runs_and_plots_are_pngs(runs: Path, tmp_path: Path):
    out = tmp_path / "report"
    result = cli("ftctl", "report", str(runs), "--output", str(out), "--format", "html")
    assert result.returncode == 0, result.stderr
    written = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert (out / "report.html").read_text().startswith("<!doctype html>")

    tasks = {t["task"]: t for t in written["tasks"]}
    assert set(tasks) == {"sst2", "conll2003", "summarization"}
    assert written["runs"] == 7
    for task in tasks.values():
        for row in task["rows"]:
            run_dir = Path(row["run_dir"])
            record = json.loads((run_dir / "run.json").read_text())
            for key in (
                "trainable_params",
                "total_params",
                "trainable_percent",
                "reduction_percent",
                "train_runtime_s",
                "samples_per_second",
                "tokens_per_second",
                "peak_memory_mb",
                "device_hours",
            ):
                assert row[key] == record[key], (run_dir.name, key)
            assert row["plan_memory_error"] == record["plan"]["error"]["peak_memory"]
            assert row["plan_time_error"] == record["plan"]["error"]["train_time"]
            assert row["size_mb"] == record["saved_weights"]["mb"]
            if (run_dir / "eval.json").is_file():
                scored = json.loads((run_dir / "eval.json").read_text())
                assert row["after"] == {
                    k: v
                    for k, v in scored.items()
                    if k not in ("details", "info", "baseline", "baseline_kind", "few_shot")
                }
            else:  # never evaluated: the run's own validation metrics, said so
                assert row["after"] == record["metrics"] and row["after_source"].startswith("run.json")
            if row["before"] is not None:
                source = json.loads((Path(row["baseline_from"]) / "eval.json").read_text())["baseline"]
                assert row["before"] == {k: v for k, v in source.items() if k != "details"}
                assert row["delta"] == {k: row["after"][k] - row["before"][k] for k in row["before"]}
            # the markdown shows the same numbers, formatted
            assert f"| {row['model']} | {row['method']} | {row['trainable_params']:,} | " in md
            for metric, value in row["after"].items():
                assert f"{value:.4f}" in md, (metric, value)

    # the cost column: device-hours per run, summed per task and for the study; the planner's error per run
    assert "| -4.2% | 0.0069 |" in md  # memory vs plan, device-hours (12.35 s x 2 processes)
    hours = [r["device_hours"] for t in tasks.values() for r in t["rows"]]
    assert f"{sum(hours):.4f} device-hours in all" in md
    assert f"Device-hours, all 3 runs of this task: {3 * 12.345678901 * 2 / 3600:.4f}." in md

    sst2 = {r["method"]: r for r in tasks["sst2"]["rows"]}
    # full fine-tuning was evaluated without --baseline: it shares the LoRA run's (same model, task, data)
    assert sst2["full"]["before"] == sst2["lora"]["before"] and sst2["full"]["baseline_from"].endswith("sst2-lora")
    assert sst2["head"]["before"] is None  # not evaluated: no like-for-like baseline to borrow
    assert sst2["lora"]["details"][0]["kind"] == "matrix"
    assert sst2["lora"]["details"][0]["values"] == confusion(["negative", "positive"], 1)["matrix"]
    assert "| 0.4640 | 0.8160 | +0.3520 |" in md  # accuracy before, after, delta of the LoRA run
    assert tasks["sst2"]["metrics"][:2] == ["accuracy", "f1"]  # the task's own order, main metric first

    ner = {r["method"]: r for r in tasks["conll2003"]["rows"]}
    bars = ner["lora"]["details"][0]
    assert bars["kind"] == "bars" and bars["values"][bars["labels"].index("PER")] == 0.9243243243243243
    assert "details" not in ner["head"]
    assert "| PER | 0.9243 |" in md

    summary = {r["method"]: r for r in tasks["summarization"]["rows"]}
    per_example = summary["lora"]["per_example"]
    values = [json.loads(line)["rougeL"] for line in (runs / "sum-lora" / "eval_predictions.jsonl").open()]
    assert per_example["rougeL"]["after"]["n"] == 40
    assert per_example["rougeL"]["after"]["mean"] == pytest.approx(sum(values) / 40)
    assert "before" in per_example["rougeL"]
    # no score fields in its predictions: scored per example with the task's own ROUGE
    computed = summary["full"]["per_example"]
    assert set(computed) >= {"rouge1", "rougeL"} and computed["rougeL"]["after"]["n"] == 30

    expected = {  # every task compares two or more methods: each gets a Pareto plot of metric against cost
        "sst2": {"pareto", "loss", "metrics", "matrix"},
        "conll2003": {"pareto", "loss", "metrics", "bars"},
        "summarization": {"pareto", "loss", "metrics", "scores", "scatter"},
    }
    for name, kinds in expected.items():
        assert set(tasks[name]["plots"]) == kinds, (name, tasks[name]["plots"])
        for file in tasks[name]["plots"].values():
            assert_png(out / file)
            assert f"]({file})" in md
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f for t in tasks.values() for f in t["plots"].values())


def test_report_of_one_run_and_of_a_grid_layout(runs: Path, tmp_path: Path):
    """One run directory: the report goes into RUN/report; the same code as for many runs."""
    built = report.main([str(runs / "sst2-lora")])
    out = runs / "sst2-lora" / "report"
    assert (out / "report.md").is_file() and built["runs"] == 1
    assert_png(out / "sst2_metrics.png")
    # a second time: refused, the first report untouched; --overwrite replaces it
    before = (out / "report.json").stat().st_mtime_ns
    with pytest.raises(FtctlError, match="already exists; pass --overwrite"):
        report.main([str(runs / "sst2-lora")])
    assert (out / "report.json").stat().st_mtime_ns == before
    report.main([str(runs / "sst2-lora"), "--overwrite"])
    assert (out / "report.json").stat().st_mtime_ns != before


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("missing", "not a directory"),
        ("empty", "holds no grid"),
        ("unfinished", "did not finish"),
        ("two-without-output", "--output DIR"),
        ("not-a-report", "not a report directory"),
        ("bad-format", "invalid choice"),
    ],
)
def test_bad_input_is_one_error_and_writes_nothing(runs: Path, tmp_path: Path, case: str, fragment: str):
    out = tmp_path / "out"
    argv = {
        "missing": [str(tmp_path / "nope"), "--output", str(out)],
        "empty": [str(tmp_path), "--output", str(out)],
        "unfinished": [str(tmp_path / "half"), "--output", str(out)],
        "two-without-output": [str(runs / "sst2-lora"), str(runs / "ner-lora")],
        "not-a-report": [str(runs), "--output", str(runs / "sst2-lora"), "--overwrite"],
        "bad-format": [str(runs), "--output", str(out), "--format", "pdf"],
    }[case]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "spec.json").write_text("{}")
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(FtctlError, match=fragment.replace("-", r"\-")):
        report.main(argv)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing
