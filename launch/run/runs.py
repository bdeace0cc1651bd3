"""One run-loading path: options in, a checked, typed run out.

`ftctl train`, `evaluate`, `merge`, `predict`, `generate` and grid planning all turn options into a `Run` here (a
finished run through `locate` and `from_saved`): the options
resolved (`launch.run.config`), the backbone's config read (no weights), its family found, the task fitted to it, the
precision checked, the launch facts read (from `--deepspeed`, an accelerate config or the environment accelerate's
launcher exports) and the method's refusals asked. So they refuse exactly the same things, before anything is
loaded or written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from ftctl.config import RunConfig
from ftctl.errors import FtctlError, warn
from ftctl.facts import DataFacts, LaunchFacts
from ftctl.models import check_max_length, check_precision, load_config, load_tokenizer, model_family, resolve_model
from ftctl.vocab import Family
from launch.run import configs, lm_loss, tracking
from launch.run.cache import encode_cached
from launch.run.config import Resolved, resolve, resolve_values, stored_values
from launch.run.rundir import RUN_FILE, SPEC_FILE, read_json
from methods.base import Context, Method
from tasks import TASKS
from tasks.base import LoadedData, Task


@dataclass(frozen=True)
class Run:
    """A run that passed every check that needs no weights: what train, evaluate, merge and grid planning use."""

    cfg: RunConfig
    task: Task  # bound to the backbone (`task.fit`) and, for a trained run, to its learnt state
    method: Method
    explicit: list[str]  # option names the user set
    model_ref: str  # the backbone: a local directory (absolute) or a hub id
    model_config: PretrainedConfig
    family: Family
    launch: LaunchFacts = field(default_factory=LaunchFacts)

    @property
    def resolved(self) -> Resolved:
        return Resolved(self.cfg, self.task, self.method, self.explicit)

    def flat(self) -> dict[str, Any]:
        return self.resolved.flat()

    def context(self, data: DataFacts | None = None) -> Context:
        return Context(self.cfg, self.task, self.model_config, self.family, self.launch, data)


def load(
    resolved: Resolved,
    launch: LaunchFacts,
    model: str | None = None,
    state: Mapping | None = None,
    known: dict[str, PretrainedConfig] | None = None,
) -> Run:
    """Check the model and the combination; `model` overrides the configured backbone (evaluate --model, an
    adapter's base), `state` is a trained run's task state, `known` caches model configs by reference (a grid
    reads each model's once)."""
    cfg = resolved.cfg
    model_ref = resolve_model(model or cfg.model)
    check_not_another_tasks_run(model_ref, resolved.task)
    if known is not None and model_ref in known:
        model_config = known[model_ref]
    else:
        model_config = load_config(model_ref, cfg.trust_remote_code)
        if known is not None:
            known[model_ref] = model_config
    family = model_family(model_config)
    task = resolved.task.bind(state=state)
    task = task.bind(fit=task.check_model(model_config, family))
    check_precision(cfg, model_config)
    if launch.deepspeed_offload and launch.device == "cpu":
        raise FtctlError(
            "the DeepSpeed config offloads optimizer states or parameters to the CPU, and this machine has no GPU to "
            "offload from (everything is on the CPU already); use zero2 or zero3 without offload"
        )
    run = Run(cfg, task, resolved.method, resolved.explicit, model_ref, model_config, family, launch)
    run.method.check(run.context())
    return run


def with_data(run: Run, splits: tuple[str, ...] | None = None) -> tuple[Run, Any, LoadedData, dict[str, Any]]:
    """The run bound, as training binds it, to its prepared tokenizer and to what its training data taught the task
    (label names, ...); with the data and its tokenized splits (`splits`, default all; from the token cache)."""
    tokenizer = load_tokenizer(run.model_ref, run.cfg.trust_remote_code)
    run.task.prepare_tokenizer(tokenizer, run.family)
    data = run.task.load()
    task = run.task.bind(state=run.task.check_data(data.splits, training=True), tokenizer=tokenizer)
    wanted = {n: d for n, d in data.splits.items() if splits is None or n in splits}
    encoded = {name: encode_cached(task, ds, tokenizer, run.cfg.token_cache) for name, ds in wanted.items()}
    return replace(run, task=task), tokenizer, data, encoded


def check_not_another_tasks_run(model_ref: str, task: Task) -> None:
    """A run directory given as the backbone must be of the same task: another task's head (a tagger's classifier
    for a sentiment run) would be loaded as this task's, silently when the shapes happen to fit."""
    record = Path(model_ref) / RUN_FILE
    if not record.is_file():
        return
    ran = read_json(record, "run record")
    preset = (ran.get("task") or {}).get("preset")
    if isinstance(preset, str) and preset in TASKS and TASKS.get(preset).cls is not type(task):
        model = ran.get("model") or {}
        base = model.get("hub_id") or model.get("name_or_path")
        raise FtctlError(
            f"--model {model_ref} is an ftctl run of task '{preset}', whose head is not one of task "
            f"'{task.preset_name}'; start from its base model ({base}), or from a merged model (ftctl merge)"
        )


def from_argv(argv: list[str], prog: str) -> Run:
    """A training run from its command line (and --config file), launched as this process was."""
    resolved = resolve(argv, prog)
    tracking.check_available(resolved.cfg.report_to)
    run = load(resolved, launch_facts(resolved.cfg))
    lm_loss.for_run(run.task, run.method, run.launch.device == "cuda", run.launch.deepspeed_stage == 3)  # refuses
    check_max_length(run.cfg.max_length, "max_length" in resolved.explicit, run.model_config)  # what the user set
    warn_suspicious(run.cfg, resolved.explicit)
    return run


def warn_suspicious(cfg: RunConfig, explicit: list[str]) -> None:
    """Legal settings that are almost always a slip."""
    if "warmup_ratio" in explicit and "warmup_steps" in explicit:
        warn(f"--warmup-steps {cfg.warmup_steps} and --warmup-ratio {cfg.warmup_ratio} both given; the steps win")
    if cfg.learning_rate is not None and cfg.learning_rate >= 1:
        warn(
            f"--learning-rate {cfg.learning_rate:g} is far above fine-tuning rates (about 1e-5 for full fine-tuning "
            "to 1e-2 for soft prompts); training is likely to diverge"
        )


def from_record(
    config: Mapping[str, Any], state: Mapping[str, Any], where: str, model: str | None = None, **overrides: Any
) -> Run:
    """A finished run (or checkpoint) as recorded in its directory, for evaluation or merging: the recorded
    options (with `overrides`), its task state, on one process without DeepSpeed."""
    resolved = resolve_values({**stored_values(dict(config), where), **overrides})
    scoring = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_DEEPSPEED"}  # never under DeepSpeed
    return load(resolved, launch_facts(resolved.cfg, scoring), model=model, state=state)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def launch_facts(
    cfg: RunConfig, env: Mapping[str, str] | None = None, accelerate_config: dict[str, Any] | None = None
) -> LaunchFacts:
    """What launched the run, from `--deepspeed`, an accelerate config (given here when a grid plans a cell, read
    by accelerate's launcher into the environment when the process runs) and the launcher's environment."""
    env = os.environ if env is None else env
    launcher = accelerate_config or {}
    processes = int(env.get("WORLD_SIZE") or launcher.get("num_processes") or 1)
    machines = int(launcher.get("num_machines") or 1)
    if "LOCAL_WORLD_SIZE" in env:
        machines = max(1, processes // max(1, int(env["LOCAL_WORLD_SIZE"])))
    ds: dict[str, Any] | None = None
    if cfg.deepspeed:
        path = configs.deepspeed_config(cfg.deepspeed)
        ds = configs.deepspeed_settings(configs.read_deepspeed(Path(str(path))))
    elif str(launcher.get("distributed_type", "")).upper() == "DEEPSPEED":
        ds = _accelerate_deepspeed(launcher.get("deepspeed_config") or {}, configs.accelerate_deepspeed_file(launcher))
    elif env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        plugin = {
            "zero_stage": env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"),
            "offload_optimizer_device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
            "offload_param_device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"),
        }
        ds = _accelerate_deepspeed(plugin, Path(file) if file and file != "None" else None)
    if ds is not None:
        kind = "deepspeed"
    else:
        kind = "multi" if processes > 1 else "no"
    return LaunchFacts(
        num_processes=processes,
        num_machines=machines,
        distributed_type=kind,
        deepspeed_stage=ds["stage"] if ds else None,
        deepspeed_offload=bool(ds and ds["offload"]),
        deepspeed_optimizer=bool(ds and ds["optimizer"]),
        device=device(),
    )


def _accelerate_deepspeed(plugin: Mapping[str, Any], file: Path | None) -> dict[str, Any]:
    """DeepSpeed settings of an accelerate DeepSpeed plugin: its JSON file where it names one, else its own keys."""
    if file is not None and file.is_file():
        return configs.deepspeed_settings(configs.read_deepspeed(file))
    offload = any(
        str(plugin.get(key) or "none").lower() not in ("none", "")
        for key in ("offload_optimizer_device", "offload_param_device")
    )
    return {"stage": int(plugin.get("zero_stage") or 0), "offload": offload, "optimizer": False}


# ---- finished runs: evaluate, predict and generate load them here -------------------------------------------------
# scoring and inference need no logging, checkpoints or sharded optimizer; the saved result loads without DeepSpeed
SCORING = {
    "report_to": ["none"],
    "eval_strategy": "no",
    "save_strategy": "no",
    "early_stopping_patience": None,
    "save_every": None,
    "keep_last": None,
    "deepspeed": None,
}


def from_saved(weights: Path, spec: dict[str, Any], model: str | None = None, **overrides: Any) -> Run:
    """A finished run (or checkpoint) as recorded, with `overrides`; its base model from `model`, else the adapter's
    config (adapters) or the run record (full models)."""
    adapter_file = weights / "adapter_config.json"
    adapter = read_json(adapter_file, "adapter config") if adapter_file.is_file() else {}
    base = model or adapter.get("base_model_name_or_path") or spec["model_ref"]  # resolved by `load`
    where = str(weights / RUN_FILE)
    return from_record(spec["config"], spec["task_state"], where, model=base, **{**SCORING, **overrides})


def locate(run_dir: str) -> tuple[Path, dict[str, Any]]:
    """(directory holding the weights, run spec) for a finished run or a checkpoint."""
    path = Path(run_dir)
    if path.is_file():
        raise FtctlError(f"{run_dir} is a file; give the run directory that holds it ({path.parent})")
    if not path.is_dir():
        raise FtctlError(f"run directory not found: {run_dir}")
    if (path / RUN_FILE).is_file():
        record = read_json(path / RUN_FILE, "run record")
        if record.get("status") != "completed" or "config" not in record:
            raise FtctlError(f"{path / RUN_FILE} is not a completed ftctl run record")
        return path, {
            "config": record["config"],
            "task_state": record["task"]["state"],
            "model_ref": record["model"]["name_or_path"],
        }
    for spec_path in (path / SPEC_FILE, path.parent / SPEC_FILE):
        if spec_path.is_file() and path.name.startswith("checkpoint-"):
            return path, read_json(spec_path, "run spec")
    if (path / SPEC_FILE).is_file():
        checkpoints = sorted(p.name for p in path.glob("checkpoint-*"))
        hint = f"evaluate a checkpoint, e.g. {path / checkpoints[-1]}, or " if checkpoints else ""
        raise FtctlError(f"the run in {run_dir} did not finish (no run.json); {hint}continue it with --resume")
    raise FtctlError(f"{run_dir} is not an ftctl run directory (no run.json) nor a checkpoint of one")


def check_weights(weights: Path, peft: bool) -> None:
    """Refuse a directory whose weights are missing or unreadable, before loading anything."""
    name = "adapter_model.safetensors" if peft else "model.safetensors"
    files = [weights / name] if (weights / name).is_file() else sorted(weights.glob(name.replace(".", "-*.", 1)))
    if not files:
        raise FtctlError(f"{weights} has no {name}: the run directory is incomplete or damaged")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):  # checks the header against the file's length
                pass
        except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
            raise FtctlError(
                f"{file} is damaged or truncated ({str(exc).splitlines()[0]}); re-run or restore it"
            ) from None


def with_saved_tokenizer(run: Run, weights: Path) -> tuple[Run, PreTrainedTokenizerBase]:
    """The tokenizer saved with the weights, prepared for the run's family, and the run with its task bound to it."""
    tokenizer = load_tokenizer(str(weights), run.cfg.trust_remote_code)
    run.task.prepare_tokenizer(tokenizer, run.family)
    return replace(run, task=run.task.bind(tokenizer=tokenizer)), tokenizer


def load_trained(
    run: Run, weights: Path, tokenizer: PreTrainedTokenizerBase, model_kwargs: dict[str, Any]
) -> torch.nn.Module:
    """The fine-tuned model saved in `weights` (on its base model, for adapters); a failure is one line."""
    try:
        return run.method.load_trained(run.task, str(weights), run.model_ref, tokenizer, model_kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise FtctlError(f"cannot load the fine-tuned model from {weights}: {str(exc).splitlines()[0]}") from None
