"""Experiment tracking beyond TensorBoard: `--report-to mlflow` (and `wandb`, e.g. with WANDB_MODE=offline) run
through the Trainer's own integrations, which log per-step losses and evaluation metrics. ftctl adds what those
cannot know: every resolved option of the run (as `ftctl.<option>` params, so they never collide with the
TrainingArguments the integration logs itself), the task, preset, model, method and seed as tags, the run directory,
and the final validation and test metrics, which ftctl scores after the training loop has ended the tracking run.

A grid's cells log into one MLflow experiment named after the grid, with the grid's axes as tags (the grid passes
MLFLOW_EXPERIMENT_NAME and MLFLOW_TAGS, which the integration reads). The tracking libraries are optional extras.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ftctl.errors import FtctlError

if TYPE_CHECKING:  # annotations only
    from transformers import TrainerControl, TrainerState, TrainingArguments

PARAMS_PER_CALL = 100  # MLflow's limit on params logged at once


def check_available(report_to: list[str]) -> None:
    """Refuse a tracking integration whose library is not installed, before anything is loaded."""
    for name, module, extra in (("mlflow", "mlflow", "mlflow"), ("wandb", "wandb", "wandb")):
        if name in report_to and importlib.util.find_spec(module) is None:
            raise FtctlError(f"--report-to {name} needs the {name} package: pip install 'ftctl[{extra}]'")


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """Every option as an `ftctl.<name>` param, lists and None written as JSON (MLflow stores strings)."""
    return {f"ftctl.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in sorted(config.items())}


class MlflowRun(TrainerCallback):
    """Logs the run's options and tags into the MLflow run the Trainer's integration opened, remembers that run,
    and records the final metrics into it once ftctl has scored them (`finish`). Main process only."""

    def __init__(self, config: dict[str, Any], tags: dict[str, str], run_dir: Path):
        self.config = config
        self.tags = tags
        self.run_dir = run_dir
        self.run_id: str | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        import mlflow  # deferred: an optional extra, and a heavy import

        active = mlflow.active_run() if state.is_world_process_zero else None
        if active is None:
            return
        self.run_id = active.info.run_id
        params = list(flat_params(self.config).items())
        for start in range(0, len(params), PARAMS_PER_CALL):
            mlflow.log_params(dict(params[start : start + PARAMS_PER_CALL]))
        mlflow.set_tags({**self.tags, "ftctl.run_dir": str(self.run_dir.resolve())})

    def finish(self, metrics: dict[str, Any], test_metrics: dict[str, Any] | None) -> None:
        """The final scores, into the run the integration has already closed."""
        if self.run_id is None:
            return
        import mlflow  # deferred: an optional extra, and a heavy import

        final = {f"final_validation_{k}": float(v) for k, v in metrics.items() if _is_number(v)}
        final.update({f"final_test_{k}": float(v) for k, v in (test_metrics or {}).items() if _is_number(v)})
        with mlflow.start_run(run_id=self.run_id):
            mlflow.log_metrics(final)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
