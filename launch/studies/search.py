"""A grid's search: before the final runs, each (model, task, method) tries the values the grid file's `search:`
lists, and all of its seeds then run with the best of them.

Learning rate moves results more than the choice of method does; one rate for every method makes a study compare
rates, not methods. So a search is per (model, task, method), and:

- its trials are ordinary training processes, one per combination of values (Optuna's `GridSampler`; `auto` is a
  range around the cell's own default learning rate, AUTO_FACTORS), run with the grid's first seed;
- they are scored on a split carved from the training data (`--validation-from-train`), never on the data the
  final runs are evaluated on;
- clearly weak trials stop early: each evaluation during training is reported to Optuna's
  `SuccessiveHalvingPruner` at the share of training done (steps are percent, so the schedule does not depend on
  how often a run evaluates). From MIN_RESOURCE percent on, a trial continues only while it is in the top
  1/REDUCTION of the trials that got that far (the best of them while fewer than 2 x REDUCTION have): half-way
  through, the weaker half stops. Earlier than that, learning rates that start slowly would be stopped for it
  (seen on tiny runs: the best rate was behind at its second evaluation). A pruned trial is stopped as a signal
  stops any run (checkpoint, exit);
- the Optuna study lives in `GRID/search/optuna.db` (SQLite) and each trial's run directory in
  `GRID/search/<key>/trial-<n>`: finished trials are kept, a trial interrupted by a signal resumes from its
  checkpoint when the grid runs again, and a changed search (other values, other cell options) is a new study;
- the chosen values are recorded per cell (`grid.json`: `searched`) and written into the cell's config, and the
  whole search (every trial, its intermediate values, the best) into `grid.json` for the report's search curves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from ftctl.errors import FtctlError
from launch.run import rundir
from launch.run.config import resolve_values
from launch.run.progress import EVENTS_FILE
from launch.studies.spec import EXCLUDED, REFUSED, Cell, GridSpec
from tasks import TASKS
from tasks._metrics import higher_is_better

SEARCH_DIR = "search"
STORAGE = "optuna.db"
AUTO_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)  # `learning_rate: auto`: two decades around the default, log-spaced
MIN_RESOURCE = 50  # percent of training a trial always gets
REDUCTION = 2


def optuna_module() -> Any:
    import optuna  # deferred: a heavy import (SQLAlchemy, alembic), paid only by grids that search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclasses.dataclass
class Search:
    """The search of one (model, task, method): its space, the cell whose options the trials take, and its study."""

    key: str
    cells: list[Cell]
    space: dict[str, list[Any]]
    trial_options: dict[str, Any]  # the representative cell's options, plus the search's own settings
    metric: str
    direction: str
    root: Path

    @property
    def study_name(self) -> str:
        """Named after what decides its results: a changed space or changed cell options make a new study."""
        digest = json.dumps({"space": self.space, "options": self.trial_options}, sort_keys=True, default=str)
        return f"{self.key}-{hashlib.sha1(digest.encode()).hexdigest()[:10]}"

    def study(self) -> Any:
        optuna = optuna_module()
        self.root.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.RDBStorage(f"sqlite:///{(self.root / STORAGE).resolve()}")
        return optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            load_if_exists=True,
            direction=self.direction,
            sampler=optuna.samplers.GridSampler(self.space, seed=0),
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=MIN_RESOURCE, reduction_factor=REDUCTION),
        )

    def size(self) -> int:
        n = 1
        for values in self.space.values():
            n *= len(values)
        return n

    def trial_dir(self, number: int) -> Path:
        return self.root / self.key / f"trial-{number}"

    def trial_config(self, params: dict[str, Any]) -> dict[str, Any]:
        return {**self.trial_options, **params, "validation_from_train": True}

    def finished(self, study: Any) -> bool:
        """Every combination has a finished trial (complete, pruned or failed)."""
        done = {json.dumps(t.params, sort_keys=True) for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        return len(done) >= self.size()

    def best(self, study: Any) -> dict[str, Any] | None:
        complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if not complete:
            return None
        trial = study.best_trial
        return {"params": dict(trial.params), "value": trial.value, "trial": trial.number}

    def record(self, study: Any) -> dict[str, Any]:
        """The whole search as grid.json and the report keep it."""
        trials = [
            {
                "number": t.number,
                "params": dict(t.params),
                "state": t.state.name.lower(),
                "value": t.value,
                "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "run_dir": str(self.trial_dir(t.number).relative_to(self.root.parent)),
                "error": t.user_attrs.get("error"),
            }
            for t in study.get_trials(deepcopy=False)
        ]
        return {
            "model": self.cells[0].model.label,
            "task": self.cells[0].task.label,
            "method": self.cells[0].method.label,
            "space": self.space,
            "metric": self.metric,
            "direction": self.direction,
            "study": self.study_name,
            "scored_on": "a split carved from the training data (--validation-from-train)",
            "trials": trials,
            "best": self.best(study) if self.finished(study) else None,
        }

    def apply(self, best: dict[str, Any]) -> None:
        """Every seed of this (model, task, method) runs with the chosen values."""
        for cell in self.cells:
            cell.searched = dict(best["params"])
            cell.values.update(best["params"])


def searches(spec: GridSpec, cells: list[Cell], grid_dir: Path) -> list[Search]:
    """The searches a grid asks for: one per (model, task, method) whose cells have searched options and can run."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell.search_key and cell.status not in (REFUSED, EXCLUDED):
            groups.setdefault(cell.search_key, []).append(cell)
    out = []
    for key, members in groups.items():
        first = members[0]
        space = {name: _values(first, name, given) for name, given in first.search_space.items()}
        metric = TASKS.get(first.task.name).cls.primary_metric
        options = {**first.values, **spec.search_settings, "seed": first.seed}  # the grid's first seed
        search = Search(
            key=key,
            cells=members,
            space=space,
            trial_options=options,
            metric=metric,
            direction="maximize" if higher_is_better(metric) else "minimize",
            root=grid_dir / SEARCH_DIR,
        )
        _check_trials_evaluate(search)
        out.append(search)
    return out


def _values(cell: Cell, name: str, given: Any) -> list[Any]:
    if given != "auto":
        return list(given)
    default = resolve_values(dict(cell.values)).cfg.learning_rate
    if not default:
        raise FtctlError(f"search: cell {cell.id} has no default learning rate to search around; list the values")
    return [float(f"{default * factor:.3g}") for factor in AUTO_FACTORS]


def _check_trials_evaluate(search: Search) -> None:
    """A trial is scored by its evaluations during training: it must make some."""
    cfg = resolve_values(search.trial_config({k: v[0] for k, v in search.space.items()})).cfg
    if cfg.eval_strategy == "no":
        raise FtctlError(
            f"search: the trials of {search.key} would never evaluate (eval_strategy: no); give the search its own "
            "evaluation schedule, e.g. `search: {settings: {eval_strategy: epoch, save_strategy: epoch}}`"
        )


def interrupted(study: Any) -> list[Any]:
    """The trials a signal stopped in an earlier run of the grid (still RUNNING in the study), to run again first.
    Optuna has no public way to take up a RUNNING trial again: its `Trial` is built from the frozen trial's storage
    id, the one private attribute ftctl reads from Optuna."""
    optuna = optuna_module()
    running = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    return [optuna.trial.Trial(study, frozen._trial_id) for frozen in running]


def ask(study: Any, space: dict[str, list[Any]]) -> Any:
    """A new trial, its values drawn from the space (every searched option is categorical: a list of values)."""
    trial = study.ask()
    for name, values in space.items():
        trial.suggest_categorical(name, values)
    return trial


def trial_state(name: str) -> Any:
    """Optuna's TrialState of that name (PRUNED, FAIL)."""
    return getattr(optuna_module().trial.TrialState, name)


def tell(study: Any, trial: Any, value: float | None = None, state: Any = None) -> None:
    """`study.tell`. Optuna's GridSampler asks the study to stop once every combination is done, which Optuna allows
    only inside `study.optimize`; this runner asks and tells instead (its trials are processes), and Optuna stores
    the trial before that request (a `finally`), so the request is the only thing dropped."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def apply_known(found: list[Search]) -> None:
    """Cells of searches that finished in an earlier run of the grid take the chosen values now, before planning
    compares finished cells with their options."""
    for search in found:
        if not (search.root / STORAGE).is_file():
            continue
        study = search.study()
        best = search.best(study) if search.finished(study) else None
        if best:
            search.apply(best)


def evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluate events a trial has written so far."""
    path = run_dir / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if row.get("event") == "evaluate":
            events.append(row)
    return events


def percent_done(event: dict[str, Any]) -> int | None:
    """The share of training an evaluation came at, in percent (the pruner's step); none for the untrained model."""
    step, total = event.get("step") or 0, event.get("max_steps") or 0
    if step <= 0 or total <= 0:
        return None
    return max(1, min(100, round(100 * step / total)))


def trial_value(run_dir: Path, metric: str) -> float | None:
    """A finished trial's score: its final validation metric (the best checkpoint's, where the run keeps it)."""
    path = run_dir / rundir.RUN_FILE
    if not path.is_file():
        return None
    value = (rundir.read_json(path, "run record").get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None
