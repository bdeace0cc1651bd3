"""Comparison grids: `ftctl grid GRID.yaml` and `python -m launch.studies.grid GRID.yaml` run `main`.

A grid is the product of its axes (models x tasks x methods x seeds), each cell one ordinary `launch.train` job in
its own run directory under the grid directory, then scored by `launch.evaluate` (on the test split when the data
has one, else the validation split, exactly as `ftctl evaluate` does). The zero-shot baseline of each (model, task)
pair is scored once, by the first of its cells to be evaluated (`--baseline`), and shared by the others.

Every cell is a separate process: peak memory and throughput are per cell, a crash or an out-of-memory error costs
one cell, not the grid, and GPU memory is returned between cells. The grid checks the whole file before it writes
anything (unknown keys, option values, models, data files), refuses the combinations a method or task cannot run
(they are listed with the reason, not run), and records its state in `grid.json` after every step, atomically.
Re-running the same command resumes: finished cells are kept, an interrupted cell continues from its last
checkpoint (or starts again when it has none), failed cells are tried again.
"""

from __future__ import annotations

import fcntl
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from ftctl.errors import FtctlError
from ftctl.options import Parser
from launch.plan import checked, finish, plan_options, plan_run
from launch.run import launcher, runs
from launch.run.config import resolve_values
from launch.run.configs import RECIPES
from launch.run.console import make_console
from launch.run.planning.fit import parse_size
from launch.run.quiet import quiet
from launch.studies import report
from launch.studies import search as searching
from launch.studies.executors import RETRIES, Executor, Machine, RayCluster
from launch.studies.planning import cell_launcher, cell_needs, plan_cells
from launch.studies.scheduler import CellsFailed, Scheduler
from launch.studies.spec import FAILED, FINAL, REFUSED, TRAINED, GridSpec, expand, load_spec
from launch.studies.state import CONFIGS, GRID_FILE, LOGS, SPEC_COPY

LOCK = ".grid.lock"


# ---- entry point ---------------------------------------------------------------------------------------------------
def build_parser() -> Any:
    parser = Parser(
        prog="ftctl grid",
        description="Run a comparison grid (models x tasks x methods x seeds) from a YAML file, one run directory "
        "per cell; re-running the same command resumes it. See README, 'Comparison grids'.",
    )
    parser.add_argument("grid", metavar="GRID.yaml", help="the grid file")
    parser.add_argument(
        "--output-dir", metavar="DIR", help="grid directory (default: the file's output_dir, else grids/<file name>)"
    )
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    parser.add_argument("--max-cells", type=int, metavar="N", help="run at most N cells this time, then stop")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the file and print the cells and their commands; run and write nothing",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="write the report to GRID_DIR/report at the end (replacing an earlier one)",
    )
    group = parser.add_argument_group("launcher (each cell through accelerate launch; also `launcher:` in the file)")
    group.add_argument(
        "--accelerate-config",
        metavar="NAME|PATH",
        help="accelerate config: a file in accelerate_configs/ (without .yaml) or a path",
    )
    group.add_argument("--num-processes", type=int, metavar="N", help="processes per cell")
    where = parser.add_argument_group("where cells run (README, 'Scaling out')")
    where.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="run up to N cells at once on this machine, each on GPUs of its own, or its share of the CPU cores "
        "(default 1)",
    )
    where.add_argument(
        "--executor", choices=("local", "ray"), default="local", help="local (this machine) or ray (a Ray cluster)"
    )
    where.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster (HOST:6379, ray://HOST:10001, auto); default: a local one",
    )
    where.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="memory per GPU the cells may use (16GiB): a cell predicted not to fit stops the grid before it starts",
    )
    where.add_argument(
        "--retries",
        type=int,
        default=RETRIES,
        metavar="N",
        help=f"a cell whose process or node is killed runs again, from its checkpoint, at most N times (default "
        f"{RETRIES})",
    )
    return parser


def grid_file(given: str) -> str:
    """The grid file: a path, or the name of a recipe ftctl ships (`ftctl grid demo`)."""
    path = Path(given)
    if not path.exists() and not path.suffix and (RECIPES / f"{given}.yaml").is_file():
        return str(RECIPES / f"{given}.yaml")
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise FtctlError(f"grid file not found: {given}; give a path, or the name of a shipped recipe: {names}")
    return given


def _grid_dir(spec: GridSpec, given: str | None) -> Path:
    path = Path(given or spec.output_dir or Path("grids") / spec.path.stem)
    if path.exists() and not path.is_dir():
        raise FtctlError(f"grid directory {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / GRID_FILE).is_file():
        raise FtctlError(
            f"{path} exists, is not empty and holds no {GRID_FILE}: not a grid directory; choose another --output-dir"
        )
    return path


def _launch_options(spec: GridSpec, opts: dict[str, Any]) -> dict[str, Any]:
    options = dict(spec.launcher)
    for key in ("accelerate_config", "num_processes"):
        if opts.get(key) is not None:
            options[key] = opts[key]
    if options.get("num_processes") is not None and (
        not isinstance(options["num_processes"], int) or options["num_processes"] < 1
    ):
        raise FtctlError(f"launcher num_processes must be a positive integer, got {options['num_processes']!r}")

    if options.get("accelerate_config"):
        launcher.resolve_accelerate_config(str(options["accelerate_config"]))
    wanted = launcher.wants_launcher({**options, "dry_run": False})
    return options if wanted else {}


class _Lock:
    """One `ftctl grid` per grid directory at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.file: Any = None

    def __enter__(self) -> _Lock:
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise FtctlError(f"another ftctl grid is running in {self.path.parent}; wait for it to finish") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a grid; returns the grid state written to grid.json."""
    quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_strict(argv)
    if opts["max_cells"] is not None and opts["max_cells"] < 1:
        raise FtctlError(f"--max-cells must be at least 1, got {opts['max_cells']}")
    opts["limit_mb"] = _check_executor_options(opts)
    spec = load_spec(grid_file(opts["grid"]))
    launch_options = _launch_options(spec, opts)
    grid_dir = _grid_dir(spec, opts["output_dir"])
    cells = expand(spec)
    found = searching.searches(spec, cells, grid_dir)
    searching.apply_known(found)  # values chosen by an earlier run of the grid, before planning compares cells
    loaded = plan_cells(spec, cells, grid_dir, launch_options)
    command = ["ftctl", "grid", *argv]
    if opts["dry_run"]:
        return _dry_run(Scheduler(spec, cells, grid_dir, launch_options, command, found))
    executor = _executor(opts, grid_dir)
    try:
        # predicted memory packs cells onto GPUs (or the host's memory) where the executor packs them
        needs = cell_needs(cells, loaded, executor, opts["limit_mb"])
        runner = Scheduler(spec, cells, grid_dir, launch_options, command, found, executor, needs, opts["retries"])
        return _run(runner, opts, console=make_console())
    finally:
        executor.close()


def _check_executor_options(opts: dict[str, Any]) -> float | None:
    """The executor options checked; returns --gpu-memory in MiB (None when not given)."""
    if opts["jobs"] is not None and opts["jobs"] < 1:
        raise FtctlError(f"--jobs must be at least 1, got {opts['jobs']}")
    if opts["jobs"] is not None and opts["executor"] == "ray":
        raise FtctlError("--jobs is for the local executor; on Ray the cells' resources decide how many run at once")
    if opts["ray_address"] and opts["executor"] != "ray":
        raise FtctlError("--ray-address needs --executor ray")
    if opts["retries"] < 0:
        raise FtctlError(f"--retries must be 0 or more, got {opts['retries']}")
    return parse_size(opts["gpu_memory"]) if opts["gpu_memory"] else None


def _executor(opts: dict[str, Any], grid_dir: Path) -> Executor:
    """This machine, or the Ray cluster (connected, and checked to share the grid directory). A grid directory made
    only for that check is removed when the check fails."""
    if opts["executor"] != "ray":
        return Machine(opts["jobs"] or 1, opts["limit_mb"])
    existed = grid_dir.exists()
    try:
        return RayCluster(opts["ray_address"], grid_dir, opts["retries"])
    except FtctlError:
        if not existed and grid_dir.is_dir() and not any(grid_dir.iterdir()):
            grid_dir.rmdir()
        raise


def _where(runner: Scheduler) -> str:
    """Where the cells run, when not one at a time here."""
    described = runner.executor.describe()
    if described["kind"] == "ray":
        return f" (Ray, {described['address']}: {described['nodes']} nodes, {described['devices']})"
    return f" ({described['jobs']} at a time on {described['devices']})" if described["jobs"] > 1 else ""


def _dry_run(runner: Scheduler) -> dict[str, Any]:
    state = runner.state()
    for item in runner.searches:
        chosen = f"chosen: {item.cells[0].searched}" if item.cells[0].searched else f"{item.size()} trials"
        print(f"search {item.key}: {item.space} ({chosen}; scored on a split of the training data)")
    for cell in runner.cells:
        print(f"{cell.id}: {cell.status}" + (f" ({cell.error})" if cell.status == REFUSED else ""))
        if cell.status not in FINAL:
            if cell.status != TRAINED:
                print(f"    {shlex.join(runner.train_command(cell))}")
            # as the run would: the first cell of a (model, task) scores its baseline
            print(f"    ftctl evaluate {shlex.join(runner.evaluate_args(cell))}")
    return state


def _run(runner: Scheduler, opts: dict[str, Any], console: Any) -> dict[str, Any]:
    spec, cells, grid_dir = runner.spec, runner.cells, runner.dir

    grid_dir.mkdir(parents=True, exist_ok=True)
    with _Lock(grid_dir / LOCK):
        (grid_dir / CONFIGS).mkdir(exist_ok=True)
        (grid_dir / LOGS).mkdir(exist_ok=True)
        if spec.path.resolve() != (grid_dir / SPEC_COPY).resolve():
            shutil.copyfile(spec.path, grid_dir / SPEC_COPY)
        runner.save()
        waiting = [c for c in cells if c.status not in FINAL]
        refused = [c for c in cells if c.status == REFUSED]
        console.print(
            f"grid {spec.name}: {len(cells)} cells, {len(cells) - len(waiting) - len(refused)} already done, "
            f"{len(refused)} refused, {len(waiting)} to run -> {grid_dir}{_where(runner)}",
            markup=False,
        )
        for cell in refused:
            console.print(f"  refused {cell.id}: {cell.error}", markup=False)
        try:
            runner.run(opts["max_cells"], opts["fail_fast"])
        finally:
            if opts["report"]:
                _report(grid_dir, console)
    state = runner.state()
    failed = [c for c in cells if c.status == FAILED]
    left = [c for c in cells if c.status not in FINAL and c.status != FAILED]
    console.print(f"report it: ftctl report {grid_dir}", markup=False)
    if failed:
        names = "; ".join(f"{c.id} ({c.error})" for c in failed[:3]) + (" ..." if len(failed) > 3 else "")
        raise CellsFailed(
            f"{len(failed)} of {len(cells)} cells failed: {names}; logs in {grid_dir / LOGS}; fix and "
            "run the same command again to retry only those"
        )
    if left:
        console.print(f"stopped with {len(left)} cells left; run the same command again to continue", markup=False)
    return state


def plan_main(argv: list[str]) -> list[dict[str, Any]]:
    """`ftctl plan GRID.yaml`: every cell's predicted peak memory and time (cells that differ only in their seed
    share a row), whether it fits `--gpu-memory`, and what would make it fit; refused cells say why."""
    quiet()
    parser = plan_options("ftctl plan")
    parser.add_argument("grid", metavar="GRID.yaml")
    opts = checked(parser.parse_strict(argv))
    spec = load_spec(grid_file(opts["grid"]))
    accelerate = cell_launcher(_launch_options(spec, {}))
    known: dict[str, Any] = {}
    rows, seen = [], set()
    for cell in expand(spec):
        values = {k: v for k, v in cell.values.items() if k != "seed"}
        key = json.dumps(values, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        labels = cell.labels()
        label = cell.id if len(spec.seeds) == 1 else "__".join(str(labels[k]) for k in ("model", "task", "method"))
        resolved = resolve_values(dict(cell.values))
        try:
            run = runs.load(resolved, runs.launch_facts(resolved.cfg, {}, accelerate), known=known)
        except FtctlError as exc:
            rows.append({"run": label, "advice": f"refused: {exc}"})
            continue
        rows.append(plan_run(run, label, opts))
    finish(rows, opts)
    return rows


def _report(grid_dir: Path, console: Any) -> None:
    if not (grid_dir / GRID_FILE).is_file():
        return
    out = grid_dir / "report"
    try:
        report.build([str(grid_dir)], out, overwrite=True)
        console.print(f"wrote {out / 'report.md'}", markup=False)
    except FtctlError as exc:  # no finished cell yet: nothing to report, and no reason to fail the grid over it
        console.print(f"no report: {exc}", markup=False)


if __name__ == "__main__":
    from ftctl.errors import run_main

    sys.exit(run_main(main))
