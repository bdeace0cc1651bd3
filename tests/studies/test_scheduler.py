"""The grid's scheduler against a stand-in executor written here: it only ever talks to the `Executor` protocol, so
this one (which "runs" a cell by writing the files a finished run leaves) is enough to check the scheduling itself:
cells start in the grid's order as the executor has room, no more at once than it has room for, a failure is the
cell's with the executor's reason, the first cell of a (model, task) pair to start scores its baseline, and a signal
reaches every running cell and stops the grid resumably."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from launch.studies.executors import CellJob, Need, Outcome
from launch.studies.scheduler import GridStopped, Scheduler
from launch.studies.spec import DONE, FAILED, INTERRUPTED, expand, load_spec
from launch.studies.state import CONFIGS, GRID_FILE, LOGS


class StandInRun:
    """A cell that 'trains' for `polls` looks, then leaves run.json and eval.json (or fails, if told to)."""

    def __init__(self, job: CellJob, polls: int, fail: str | None):
        self.job, self.polls, self.fail = job, polls, fail
        self.where, self.retried, self.signalled = "stand-in", 0, None

    @property
    def stage(self) -> str:
        return "train"

    def poll(self) -> Outcome | None:
        if self.signalled is not None:
            return Outcome("train", 128 + self.signalled)
        self.polls -= 1
        if self.polls > 0:
            return None
        if self.fail:
            return Outcome("train", 1, self.fail)
        self.job.run_dir.mkdir(parents=True, exist_ok=True)
        (self.job.run_dir / "run.json").write_text(json.dumps({"trainable_percent": 1.0, "metrics": {}}))
        (self.job.run_dir / "eval.json").write_text(json.dumps({"accuracy": 0.75}))
        return Outcome("done")

    def signal(self, signum: int) -> None:
        self.signalled = signum


class StandIn:
    """Room for `room` cells at a time; records every start and the most cells it held at once."""

    kind = "stand-in"
    device = "cpu"
    packs = False

    def __init__(self, room: int, fail: dict[str, str] | None = None, polls: int = 2, on_start=None):
        self.room, self.fail, self.polls, self.on_start = room, fail or {}, polls, on_start
        self.running: list[StandInRun] = []
        self.started: list[CellJob] = []
        self.most = 0

    def describe(self) -> dict:
        return {"kind": self.kind, "room": self.room}

    def check(self, cell_id: str, need: Need) -> None:
        return None

    def start(self, job: CellJob, need: Need) -> StandInRun | None:
        self.running = [r for r in self.running if r.polls > 0 and r.signalled is None]
        if len(self.running) >= self.room:
            return None
        run = StandInRun(job, self.polls, self.fail.get(job.cell_id))
        self.running.append(run)
        self.started.append(job)
        self.most = max(self.most, len(self.running))
        if self.on_start:
            self.on_start(job)
        return run

    def close(self) -> None:
        return None


@pytest.fixture
def grid(tmp_path: Path):
    """Four cells of a grid (one model and task, two methods, two seeds: one baseline pair), planned as fresh."""
    spec_file = tmp_path / "g.yaml"
    for name in ("t.jsonl", "v.jsonl"):
        (tmp_path / name).write_text('{"sentence": "fine", "label": 1}\n')
    spec_file.write_text(yaml.safe_dump({
        "name": "stand-in", "models": {"m": "any/model"},
        "tasks": {"sst2": {"train_file": str(tmp_path / "t.jsonl"), "validation_file": str(tmp_path / "v.jsonl")}},
        "methods": ["lora", "head"], "seeds": [1, 2], "baseline": True,
    }))  # fmt: skip
    spec = load_spec(str(spec_file))
    cells = expand(spec)
    out = tmp_path / "grid"
    for folder in (CONFIGS, LOGS):
        (out / folder).mkdir(parents=True)
    return spec, cells, out


def test_cells_start_in_order_as_the_executor_has_room(grid):
    spec, cells, out = grid
    executor = StandIn(room=2, fail={cells[1].id: "its node fell over"})
    Scheduler(spec, cells, out, {}, ["ftctl", "grid"], executor=executor).run(None, fail_fast=False)
    assert [j.cell_id for j in executor.started] == [c.id for c in cells]
    assert executor.most == 2  # two at a time: room for two, and never more
    state = json.loads((out / GRID_FILE).read_text())
    by_id = {c["id"]: c for c in state["cells"]}
    assert by_id[cells[1].id]["status"] == FAILED and by_id[cells[1].id]["error"] == "train: its node fell over"
    assert [by_id[c.id]["status"] for c in cells if c is not cells[1]] == [DONE] * 3
    assert state["executor"] == {"kind": "stand-in", "room": 2}
    # one (model, task) pair: the first cell to start scores the baseline, and only it
    assert ["--baseline" in j.evaluate for j in executor.started] == [True, False, False, False]
    assert by_id[cells[0].id]["baseline_cell"] == cells[0].id


def test_a_failed_baseline_claim_passes_to_the_next_cell_of_the_pair(grid):
    spec, cells, out = grid
    executor = StandIn(room=1, fail={cells[0].id: "out of memory"})
    Scheduler(spec, cells, out, {}, ["ftctl", "grid"], executor=executor).run(None, fail_fast=False)
    assert ["--baseline" in j.evaluate for j in executor.started] == [True, True, False, False]


def test_fail_fast_starts_nothing_after_a_failure(grid):
    spec, cells, out = grid
    executor = StandIn(room=1, fail={cells[0].id: "bad data"})
    Scheduler(spec, cells, out, {}, ["ftctl", "grid"], executor=executor).run(None, fail_fast=True)
    assert [j.cell_id for j in executor.started] == [cells[0].id]


def test_a_signal_reaches_every_running_cell_and_stops_the_grid(grid):
    spec, cells, out = grid
    sent = []

    def on_start(job: CellJob) -> None:
        if len(sent) == 0 and job.cell_id == cells[1].id:  # both running: the grid is told to stop
            sent.append(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)

    executor = StandIn(room=2, polls=10, on_start=on_start)
    scheduler = Scheduler(spec, cells, out, {}, ["ftctl", "grid"], executor=executor)
    with pytest.raises(GridStopped, match="SIGTERM received: the grid stopped during cell") as stopped:
        scheduler.run(None, fail_fast=False)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert [r.signalled for r in executor.running] == [signal.SIGTERM, signal.SIGTERM]
    state = {c["id"]: c["status"] for c in json.loads((out / GRID_FILE).read_text())["cells"]}
    assert [state[c.id] for c in cells[:2]] == [INTERRUPTED, INTERRUPTED]
    assert len(executor.started) == 2  # nothing started after the signal
