"""`ftctl grid`: the grid file is checked before anything is written; cells run as real `launch.train` and
`launch.evaluate` processes; a stopped or failed grid, run again, finishes only the missing cells; the zero-shot
baseline is scored once per (model, task); `ftctl report` on the grid gives the runs' own numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli

from ftctl.errors import FtctlError
from launch.studies import grid
from launch.studies import search as searching

FAST = {"epochs": 1, "batch_size": 16, "logging_steps": 4, "report_to": "none", "save_total_limit": 1, "plan": False}


def write_grid(path: Path, models: dict, data: dict, **extra) -> Path:
    spec = {
        "name": "tiny",
        "models": {"tinybert": str(models["bert"])},
        "tasks": {
            "sst2": {
                "train_file": str(data["train"]),
                "validation_file": str(data["validation"]),
                "test_file": str(data["test"]),
            }
        },
        "methods": ["lora", "head"],
        "settings": dict(FAST),
        **extra,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def state(grid_dir: Path) -> dict:
    return json.loads((grid_dir / "grid.json").read_text())


def cells(grid_dir: Path) -> dict:
    return {c["method"]: c for c in state(grid_dir)["cells"]}


def mtimes(run_dir: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}


@pytest.mark.integration  # its cells train in subprocesses
def test_a_failed_cell_is_recorded_and_the_rerun_runs_only_it(models, data, tmp_path):
    out = tmp_path / "grid"
    spec = write_grid(
        tmp_path / "g.yaml",
        models,
        data,
        output_dir=str(out),
        methods=["head", "lora"],
        overrides=[{"match": {"method": "head"}, "set": {"label_column": "no_such_column"}}],
    )
    lora, head = out / "tinybert__sst2__lora__seed42", out / "tinybert__sst2__head__seed42"

    # 1. the head cell fails (its data has no such column): the error is recorded and the grid goes on
    result = cli("ftctl", "grid", str(spec), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("failed: 1 of 2 cells failed") and "no_such_column" in result.stderr
    recorded = cells(out)
    assert recorded["head"]["status"] == "failed" and "no_such_column" in recorded["head"]["error"], recorded
    assert recorded["lora"]["status"] == "done"
    lora_files = mtimes(lora)

    # 2. fixed: only the failed cell runs; the baseline is not scored again
    write_grid(spec, models, data, output_dir=str(out), methods=["head", "lora"])
    result = cli("ftctl", "grid", str(spec), "--report", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert mtimes(lora) == lora_files
    final = state(out)
    assert final["status"] == "completed" and final["counts"] == {"done": 2}
    assert [c["baseline_cell"] for c in final["cells"]] == [lora.name, lora.name]  # head ran first, and failed
    assert "baseline" in json.loads((lora / "eval.json").read_text())
    assert "baseline" not in json.loads((head / "eval.json").read_text())
    assert (out / "configs" / f"{head.name}.yaml").is_file() and (out / "logs" / f"{head.name}.log").is_file()

    # the report written at the end: the runs' numbers, the shared baseline as "before" for both methods
    written = json.loads((out / "report" / "report.json").read_text())
    rows = {r["method"]: r for r in written["tasks"][0]["rows"]}
    baseline = json.loads((lora / "eval.json").read_text())["baseline"]
    for method, run_dir in (("lora", lora), ("head", head)):
        record = json.loads((run_dir / "run.json").read_text())
        scored = json.loads((run_dir / "eval.json").read_text())
        row = rows[method]
        assert row["trainable_params"] == record["trainable_params"]
        assert row["peak_memory_mb"] == record["peak_memory_mb"]
        assert row["after"] == {
            k: v for k, v in scored.items() if k not in ("details", "info", "baseline", "baseline_kind", "few_shot")
        }
        assert row["before"] == {k: v for k, v in baseline.items() if k != "details"}
        assert scored["info"]["data"].endswith("(test)")  # scored on the test split, as `ftctl evaluate` does
    assert (out / "report" / "sst2_matrix.png").read_bytes()[:4] == b"\x89PNG"

    # 3. a finished cell's settings changed in the file: refused before anything runs, with what changed
    write_grid(spec, models, data, output_dir=str(out), methods=["head", "lora"], settings={**FAST, "epochs": 2})
    with pytest.raises(FtctlError, match="finished with epochs=1.0 but the grid file now gives epochs=2.0"):
        grid.main([str(spec)])
    assert mtimes(lora) == lora_files


def test_plan_marks_refused_cells_and_prints_the_commands(models, data, tmp_path, capsys):
    spec = write_grid(
        tmp_path / "g.yaml",
        models,
        data,
        methods={"lora": {"lora_r": 4}, "freeze_enc": {"method": "freeze", "freeze_encoder": True}},
        seeds=[1, 2],
        launcher={"num_processes": 2},
    )
    planned = grid.main([str(spec), "--dry-run", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    status = {c["id"]: c for c in planned["cells"]}
    assert list(status) == [
        "tinybert__sst2__lora__seed1",
        "tinybert__sst2__lora__seed2",
        "tinybert__sst2__freeze_enc__seed1",
        "tinybert__sst2__freeze_enc__seed2",
    ]
    refused = status["tinybert__sst2__freeze_enc__seed1"]
    assert refused["status"] == "refused" and "--freeze-encoder needs an encoder-decoder model" in refused["error"]
    lora = status["tinybert__sst2__lora__seed1"]
    assert lora["options"]["lora_r"] == 4 and lora["options"]["seed"] == 1 and lora["options"]["epochs"] == 1.0
    printed = capsys.readouterr().out
    assert "accelerate.commands.launch" in printed and "--num_processes 2" in printed
    assert printed.count("--baseline") == 1  # the first cell of the (model, task) pair scores it, once


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"epochz": 1}, "unknown key 'epochz'"),
        ({"settings": {"learning_rat": 1e-3}}, "unknown option 'learning_rat' (did you mean 'learning_rate'?)"),
        ({"settings": {"output_dir": "x"}}, "'output_dir' is set by the grid"),
        ({"settings": {"seed": 3}}, "list seeds under `seeds:`"),
        ({"settings": {"epochs": "many"}}, "'epochs' must be a number"),
        ({"methods": {"head": {"lora_r": 4}}}, "'lora_r' applies to none of the cells"),
        ({"settings": {"lora_alpha": 8}, "methods": ["head"]}, "'lora_alpha' applies to none of the cells"),
        ({"methods": ["lorra"]}, "unknown method 'lorra' (did you mean 'lora'?)"),
        ({"tasks": {"sst2": {"train_file": "/no/such.jsonl"}}}, "train_file /no/such.jsonl not found"),
        ({"overrides": [{"match": {"method": "full"}, "set": {"epochs": 2}}]}, "method 'full' is not in the grid"),
        ({"exclude": [{"modle": "x"}]}, "unknown axis 'modle'"),
        ({"seeds": ["a"]}, "`seeds:` must be a list of integers"),
        ({"methods": {"a/b": {"method": "lora"}}}, "label 'a/b' names a directory"),
        ({"models": ["/no/such/model"]}, "model path not found"),
        ({"launcher": {"processes": 2}}, "launcher: unknown key 'processes'"),
        ({"search": {"learning_rat": [1e-3]}}, "unknown option 'learning_rat' (did you mean 'learning_rate'?)"),
        ({"search": {"lora_r": "auto"}}, "`auto` knows a range for learning_rate only"),
        ({"search": {"learning_rate": []}}, "give a list of values to try"),
        ({"search": {"learning_rate": [1e-3, 1e-3]}}, "a value is listed twice"),
        ({"search": {"target_modules": [["query"]]}}, "each value tried must be a single value"),
        ({"search": 5}, "`search:` must be `auto` or a mapping"),
        ({"search": {"seed": [1, 2]}}, "'seed' is set by the grid"),
        ({"search": {"lora_r": [4, 8]}, "methods": ["head"]}, "search: 'lora_r' is an option of none of the grid's"),
        ({"search": {"learning_rate": "auto", "settings": {"eval_strategy": "no"}}}, "would never evaluate"),
    ],
)
def test_bad_grid_files_are_one_error_and_write_nothing(models, data, tmp_path, change, fragment):
    spec = write_grid(tmp_path / "g.yaml", models, data)
    content = yaml.safe_load(spec.read_text())
    content.update(change)
    spec.write_text(yaml.safe_dump(content))
    with pytest.raises(FtctlError) as info:
        grid.main([str(spec), "--output-dir", str(tmp_path / "out")])
    assert fragment in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.integration  # its cells train in subprocesses
def test_grid_errors_from_the_cli_are_one_line(tmp_path):
    (tmp_path / "g.yaml").write_text("tasks: [sst2]\nmethods: [lora]\nsettings: {batch_sise: 8}\n")
    result = cli("ftctl", "grid", str(tmp_path / "g.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: g.yaml: settings: unknown option 'batch_sise' (did you mean 'batch_size'?); keys are `ftctl train` "
        "options"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml"]


@pytest.mark.slow
def test_sigint_stops_the_grid_and_reruns_resume_it_cell_by_cell(models, data, tmp_path):
    out = tmp_path / "grid"
    spec = write_grid(tmp_path / "g.yaml", models, data, output_dir=str(out), settings={**FAST, "epochs": 20})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ftctl"), "grid", str(spec)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = out / "logs" / "tinybert__sst2__lora__seed42.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and "step 4/" in log.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "stopped: SIGINT received" in err and "run the same command again" in err
    run_dir = out / "tinybert__sst2__lora__seed42"
    assert not (run_dir / "run.json").exists() and list(run_dir.glob("checkpoint-*"))
    assert cells(out)["lora"]["status"] == "interrupted" and cells(out)["head"]["status"] == "pending"

    # one cell at a time: the interrupted one resumes from its checkpoint, the other waits
    result = cli("ftctl", "grid", str(spec), "--max-cells", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--resume" in log.read_text().split("==== ")[-2]  # the training command of the second attempt
    assert cells(out)["lora"]["status"] == "done" and cells(out)["head"]["status"] == "pending"
    lora_files = mtimes(run_dir)
    result = cli("ftctl", "grid", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert state(out)["status"] == "completed" and mtimes(run_dir) == lora_files


def data_files(value, found: list[str]) -> list[str]:
    """Every `*_file` value of a grid file, wherever it sits (settings, axis options, overrides)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if str(key).endswith("_file") and isinstance(item, str):
                found.append(item)
            else:
                data_files(item, found)
    elif isinstance(value, list):
        for item in value:
            data_files(item, found)
    return found


@pytest.mark.parametrize(
    "path",
    sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("recipes/*.yaml"), *REPO.glob("bench/*.yaml")]),
)
def test_example_grids_are_valid(path, tmp_path, monkeypatch):
    """Every key and option of the shipped grid files is right. Their data files (the benchmark data beside the
    repository, ../shared/data) are stood in for by placeholder files at the same relative paths, so the check
    runs on any clone; no model is loaded (most are on the hub)."""
    work = tmp_path / "work"
    work.mkdir()
    for name in data_files(yaml.safe_load((REPO / path).read_text()), []):
        placeholder = (work / name).resolve()
        placeholder.parent.mkdir(parents=True, exist_ok=True)
        placeholder.write_text("placeholder\n")
    monkeypatch.chdir(work)
    spec = grid.load_spec(str(REPO / path))
    cells = grid.expand(spec)
    assert len(cells) == len(spec.models) * len(spec.tasks) * len(spec.methods) * len(spec.seeds)
    for found in searching.searches(spec, cells, tmp_path / "grid"):  # ranges resolve, trials evaluate
        assert all(len(values) > 1 for values in found.space.values()), found.space


@pytest.mark.slow
def test_cells_run_through_the_launcher_with_two_processes(models, data, tmp_path):
    out = tmp_path / "grid"
    spec = write_grid(tmp_path / "g.yaml", models, data, methods=["lora"], launcher={"num_processes": 2})
    result = cli("ftctl", "grid", str(spec), "--output-dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((out / "tinybert__sst2__lora__seed42" / "run.json").read_text())
    assert record["launch"]["num_processes"] == 2
    assert "accelerate.commands.launch" in (out / "logs" / "tinybert__sst2__lora__seed42.log").read_text()


def test_planning_refuses_what_training_would_under_the_launchers_deepspeed(models, data, tmp_path):
    """The grid loads every cell through the run loader, with the launch facts of its launcher options: AdaLoRA under
    an accelerate DeepSpeed config (ZeRO-2, its stage known only from that config) is refused before anything runs,
    with training's own message, and LoRA in the same grid is not."""
    spec = write_grid(
        tmp_path / "ds.yaml",
        models,
        data,
        methods=["lora", "adalora"],
        launcher={"accelerate_config": "deepspeed_zero2", "num_processes": 2},
    )
    result = grid.main([str(spec), "--output-dir", str(tmp_path / "out"), "--dry-run"])
    by_method = {c["method"]: c for c in result["cells"]}
    assert by_method["adalora"]["status"] == "refused", by_method["adalora"]
    assert "DeepSpeed" in by_method["adalora"]["error"] and "reallocates ranks" in by_method["adalora"]["error"]
    assert by_method["lora"]["status"] == "pending"
    assert not (tmp_path / "out").exists()
    # the same grid without the DeepSpeed launcher plans AdaLoRA to run
    plain = write_grid(tmp_path / "plain.yaml", models, data, methods=["lora", "adalora"])
    again = grid.main([str(plain), "--output-dir", str(tmp_path / "out2"), "--dry-run"])
    assert {c["method"]: c["status"] for c in again["cells"]} == {"lora": "pending", "adalora": "pending"}
