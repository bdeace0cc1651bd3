"""Planning a grid, before anything is written: every cell loaded as training would load it, the combinations a
method or task refuses marked, what is already on disk found (finished, interrupted, changed since it ran), and what
each cell to run asks of the executor (its processes and, where the executor packs cells, its predicted memory)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from ftctl.errors import FtctlError
from ftctl.models import load_config, resolve_model
from launch.plan import plan_run
from launch.run import configs, rundir, runs
from launch.run.config import resolve_values
from launch.run.planning.fit import gpu_need_mb
from launch.run.quiet import quiet_transformers
from launch.studies.executors import Executor, Need
from launch.studies.spec import DONE, EXCLUDED, FINAL, INTERRUPTED, REFUSED, TRAINED, Cell, GridSpec


def plan_cells(
    spec: GridSpec, cells: list[Cell], grid_dir: Path, launch_options: dict[str, Any]
) -> dict[str, runs.Run]:
    """Load every cell as training would (launch.run.runs: the same checks, the launch facts of the grid's launcher
    options, each model's config read once), mark the combinations a method or task refuses, and find what is
    already on disk (finished, interrupted, changed since it ran). Writes nothing; returns the cells to train, loaded
    (what the executor's needs are predicted from)."""

    quiet_transformers()
    accelerate = cell_launcher(launch_options)
    known: dict[str, Any] = {}  # model configs, read once per model: a model that cannot be read stops the grid
    loaded: dict[str, runs.Run] = {}
    for model in spec.models:
        ref = resolve_model(model.name)
        known[ref] = load_config(ref, bool(model.options.get("trust_remote_code")))
    for cell in cells:
        try:
            resolved = resolve_values(dict(cell.values))
        except FtctlError as exc:
            raise FtctlError(f"cell {cell.id}: {exc}") from None
        run_dir = grid_dir / cell.id
        _check_unchanged(cell, run_dir)
        if cell.status == EXCLUDED:
            continue
        if (run_dir / rundir.RUN_FILE).is_file():  # it ran (perhaps on another machine): keep it
            cell.status = DONE if (run_dir / "eval.json").is_file() else TRAINED
            continue
        try:
            run = runs.load(resolved, runs.launch_facts(resolved.cfg, {}, accelerate), known=known)
        except FtctlError as exc:
            cell.status, cell.error = REFUSED, str(exc)
            continue
        loaded[cell.id] = run
        if run_dir.exists() and any(run_dir.iterdir()):
            if not rundir.is_ftctl_dir(run_dir):
                raise FtctlError(
                    f"{run_dir} exists and is not an ftctl run directory; move it away to run cell {cell.id}"
                )
            cell.resume = _resumable(cell, run, run_dir)
            cell.status = INTERRUPTED
    return loaded


def cell_needs(
    cells: list[Cell], loaded: dict[str, runs.Run], executor: Executor, gpu_memory_mb: float | None
) -> dict[str, Need]:
    """What each cell to run asks of the executor: its processes and, where it packs cells, its predicted memory per
    process (`ftctl plan`'s prediction, for the executor's device; cells differing only in their seed share it).
    A cell that does not fit `--gpu-memory`, or needs more GPUs than any node has, stops the grid here, with what
    would make it fit."""

    out: dict[str, Need] = {}
    predicted: dict[str, dict[str, Any]] = {}
    device = "cuda" if gpu_memory_mb is not None else executor.device
    options = {"limit_mb": gpu_memory_mb, "device": device, "tflops": None}
    for cell in cells:
        run = loaded.get(cell.id)
        if cell.status in FINAL or run is None:
            continue
        memory = None
        if executor.packs or gpu_memory_mb is not None:
            key = json.dumps({k: v for k, v in cell.values.items() if k != "seed"}, sort_keys=True, default=str)
            if key not in predicted:
                try:
                    predicted[key] = plan_run(run, cell.id, options)
                except FtctlError as exc:  # its data, say: the cell fails with that error when it runs, alone
                    predicted[key] = {"run": cell.id, "advice": f"not predicted: {exc}"}
            row = predicted[key]
            if row.get("fits") == "no":
                raise FtctlError(
                    f"cell {cell.id} needs {gpu_need_mb(row['peak']) / 1024:.1f} GiB per GPU, more than "
                    f"--gpu-memory {(gpu_memory_mb or 0) / 1024:.1f} GiB: {row['advice']}; change it in the grid file"
                )
            if "peak" in row:
                memory = gpu_need_mb(row["peak"]) if device == "cuda" else float(row["peak"])
        need = Need(run.launch.num_processes if cell.status != TRAINED else 1, memory)
        executor.check(cell.id, need)
        out[cell.id] = need
    return out


def cell_launcher(launch_options: dict[str, Any]) -> dict[str, Any]:
    """The accelerate config each cell is launched with (its processes as the grid sets them), as a mapping."""
    config: dict[str, Any] = {}
    if launch_options.get("accelerate_config"):
        config = configs.read_accelerate(configs.resolve_accelerate_config(str(launch_options["accelerate_config"])))
    if launch_options.get("num_processes"):
        config["num_processes"] = launch_options["num_processes"]
    return config


def _resumable(cell: Cell, run: Any, run_dir: Path) -> bool:
    """An unfinished cell continues from its newest checkpoint, unless it has none, its method cannot resume, or the
    grid file now gives it other options (its checkpoint belongs to another run: it starts again)."""

    if get_last_checkpoint(str(run_dir)) is None:
        return False
    spec = run_dir / rundir.SPEC_FILE
    if not spec.is_file() or _changed(rundir.read_json(spec, "run spec"), cell.values):
        return False
    resuming = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, resume=True))
    try:
        resuming.method.check(resuming.context())
    except FtctlError:
        return False
    return True


def _changed(recorded: dict[str, Any], values: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first option whose value in a run's record (`run.json` or `spec.json`) differs from the cell's now."""
    ran = recorded.get("config", {})
    given = set(recorded.get("explicit", [])) - {"output_dir", "overwrite", "resume", "resume_from"}
    for key in sorted(given | set(values)):
        then = ran.get(key) if key in given else "(default)"
        now = values[key] if key in values else "(default)"
        if json.dumps(then, default=str) != json.dumps(now, default=str):
            return key, then, now
    return None


def _check_unchanged(cell: Cell, run_dir: Path) -> None:
    """A finished cell must have run with the options the grid file gives it now; else say what changed."""
    record_path = run_dir / rundir.RUN_FILE
    if not record_path.is_file():
        return
    changed = _changed(rundir.read_json(record_path, "run record"), cell.values)
    if changed:
        key, then, now = changed
        raise FtctlError(
            f"cell {cell.id} finished with {key}={then!r} but the grid file now gives {key}={now!r}; remove "
            f"{run_dir} to run it again with the new settings, or use another --output-dir"
        )
