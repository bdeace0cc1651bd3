"""Experiment tracking for real: a local MLflow store (SQLite in a temp directory), read back with MlflowClient.
MLflow is an optional extra (`ftctl[mlflow]`); the dev install, and so CI, has it."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import cli, run_json

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'ftctl[mlflow]')")


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


def test_a_run_logs_its_options_metrics_and_directory(train, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ftctl-test")
    out = train("--max-steps", "6", "--report-to", "mlflow", name="tracked")
    record = run_json(out)
    experiment = store.get_experiment_by_name("ftctl-test")
    (run,) = store.search_runs([experiment.experiment_id])
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["ftctl.task"] == "sst2" and params["ftctl.method"] == "lora" and params["ftctl.lora_r"] == "8"
    assert params["ftctl.seed"] == "42" and json.loads(params["ftctl.text_column"]) == ["sentence"]
    assert tags["ftctl.preset"] == "sst2" and tags["ftctl.run_dir"] == str(out.resolve())
    assert metrics["final_validation_accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert metrics["final_test_f1"] == pytest.approx(record["test_metrics"]["f1"])
    assert len(store.get_metric_history(run.info.run_id, "loss")) >= 2  # per-step, from the Trainer's integration


def test_grid_cells_log_into_one_experiment_with_the_axes_as_tags(models, data, store, tmp_path):
    spec = {
        "name": "tracked-grid",
        "models": {"tinybert": str(models["bert"])},
        "tasks": {"sst2": {"train_file": str(data["train"]), "validation_file": str(data["validation"])}},
        "methods": ["lora", "head"],
        "settings": {"max_steps": 4, "batch_size": 16, "report_to": "mlflow", "eval_strategy": "no",
                     "save_strategy": "no"},
        "baseline": False,
    }  # fmt: skip
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = cli("ftctl", "grid", str(path), "--output-dir", str(tmp_path / "grid"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = store.get_experiment_by_name("tracked-grid")
    runs = store.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["ftctl.grid.method"] for r in runs) == ["head", "lora"]
    assert {r.data.tags["ftctl.grid"] for r in runs} == {"tracked-grid"}
    assert {(r.data.tags["ftctl.grid.task"], r.data.tags["ftctl.grid.model"]) for r in runs} == {("sst2", "tinybert")}
