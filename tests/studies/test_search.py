"""A grid's search (launch/studies/search.py), run for real: trials are training processes scored on a split carved
from the training data; a hopeless learning rate is pruned early; a grid stopped in the middle of a trial resumes that
trial from its checkpoint and repeats none; every seed of the final runs trains with the chosen value."""

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

SPACE = [1e-9, 0.005, 0.05]  # 1e-9 cannot learn anything in 30 steps: it must never be chosen


@pytest.mark.slow  # minutes: in `make test-slow` (CI runs it too)
def test_search_prunes_resumes_and_gives_every_seed_the_chosen_rate(models, data, tmp_path):
    out = tmp_path / "grid"
    spec = tmp_path / "g.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "search",
                "models": {"tinybert": str(models["bert"])},
                "tasks": {"sst2": {"train_file": str(data["train"]), "validation_file": str(data["validation"])}},
                "methods": ["lora"],
                "seeds": [1, 2],
                "search": {
                    "learning_rate": SPACE,
                    "settings": {
                        "eval_strategy": "steps",
                        "eval_steps": 4,
                        "save_strategy": "steps",
                        "save_steps": 4,
                        "validation_split": 0.3,
                    },
                },
                "settings": {"epochs": 3, "batch_size": 16, "report_to": "none", "save_total_limit": 1, "plan": False},
                "output_dir": str(out),
            }
        )
    )
    dry = cli("ftctl", "grid", str(spec), "--dry-run", cwd=tmp_path)
    assert (
        dry.returncode == 0
        and "search tinybert__sst2__lora: {'learning_rate': [1e-09, 0.005, 0.05]} (3 trials" in dry.stdout
    )

    # stop the grid while its second trial trains
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ftctl"), "grid", str(spec)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    second = out / "search" / "tinybert__sst2__lora" / "trial-1"
    deadline = time.time() + 300
    while time.time() < deadline and not list(second.glob("checkpoint-*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    first = json.loads((out / "grid.json").read_text())["search"]["tinybert__sst2__lora"]
    assert [t["state"] for t in first["trials"]] == ["complete", "running"] and first["best"] is None
    assert not (out / "tinybert__sst2__lora__seed1").exists()  # no final run before the search is done

    result = cli("ftctl", "grid", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    state = json.loads((out / "grid.json").read_text())
    search = state["search"]["tinybert__sst2__lora"]
    trials = {t["params"]["learning_rate"]: t for t in search["trials"]}
    assert sorted(trials) == sorted(SPACE) and len(search["trials"]) == 3  # none run twice
    log = (out / "logs" / "search__tinybert__sst2__lora__trial-1.log").read_text()
    assert "--resume" in log.split("==== ")[-1].splitlines()[0]  # the interrupted trial continued from its checkpoint
    assert trials[1e-9]["state"] == "pruned" and len(trials[1e-9]["intermediate"]) < max(
        len(t["intermediate"]) for t in search["trials"]
    )
    chosen = search["best"]["params"]["learning_rate"]
    assert chosen != 1e-9 and search["best"]["value"] == max(
        t["value"] for t in search["trials"] if t["state"] == "complete"
    )
    # the trials never saw the evaluation data: their validation is carved from the training file
    trial = json.loads((out / search["trials"][0]["run_dir"] / "run.json").read_text())
    assert trial["data"]["source"] == f"train={data['train']} (validation carved from train)"
    assert trial["config"]["validation_from_train"] is True and trial["config"]["seed"] == 1
    for cell in state["cells"]:
        assert cell["searched"] == {"learning_rate": chosen} and cell["status"] == "done"
        record = json.loads((out / cell["run_dir"] / "run.json").read_text())
        assert record["config"]["learning_rate"] == chosen and record["config"]["validation_file"] == str(
            data["validation"]
        )

    # cached: a third run trains nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("run.json")}
    again = cli("ftctl", "grid", str(spec), cwd=tmp_path)
    assert again.returncode == 0 and "0 to run" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("run.json")} == before
    assert json.loads((out / "grid.json").read_text())["search"]["tinybert__sst2__lora"] == search
