"""The run configuration and how it is resolved.

Layering, lowest first: option defaults, the task's defaults, the method's defaults for that task, the preset's
values (dataset columns, ...), the `--config` YAML file, then command-line flags. Explicit `null` in YAML resets a
value to "decide automatically". The resolved values are written to the run directory (`run.json` and
`config.yaml`), and `--config <run>/config.yaml` repeats the run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.errors import FtctlError, suggest
from launch.options import OptionSpec, Parser, add_options, coerce, merge_specs, option, specs_of

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
STRATEGIES = ("no", "steps", "epoch")

RUN, DATA, TRAIN, EVAL, OUTPUT = "run", "data", "training", "evaluation and checkpoints", "output"


@dataclass
class RunConfig:
    """General options, shared by every task and method."""

    task: str | None = option(None, "task or preset name, e.g. sst2, classification (see `ftctl list`)", group=RUN)
    method: str = option("lora", "fine-tuning method, e.g. full, lora, head, freeze (see `ftctl list`)", group=RUN)
    model: str | None = option(
        None, "Hugging Face model id or local directory (default: the embedded pretrained MiniLM)", group=RUN
    )
    trust_remote_code: bool = option(False, "allow model repositories to run their own Python code", group=RUN)
    allow_pickle_weights: bool = option(
        False, "also load .bin (pickle) weights, which can run code when loaded; default: safetensors only", group=RUN
    )

    dataset: str | None = option(None, "Hugging Face dataset id (overrides the preset's dataset)", group=DATA)
    dataset_config: str | None = option(None, "dataset configuration name, e.g. sst2 for glue", group=DATA)
    train_file: str | None = option(None, "local training data: CSV, TSV, TXT, JSON, JSONL or Parquet", group=DATA)
    validation_file: str | None = option(
        None, "local validation data (default: a seeded split of the train data)", group=DATA
    )
    test_file: str | None = option(None, "local test data", group=DATA)
    text_column: list = option([], "text column(s); give two for sentence pairs", group=DATA)
    label_column: str | None = option(None, "label column", group=DATA)
    max_train_samples: int | None = option(None, "use at most this many training examples", group=DATA)
    max_eval_samples: int | None = option(None, "use at most this many validation/test examples", group=DATA)
    validation_split: float = option(
        0.1, "fraction of the train data held out when no validation data is given", group=DATA
    )
    max_length: int | None = option(None, "truncate inputs to this many tokens (default: per task)", group=DATA)
    token_cache: bool = option(
        True, "reuse tokenized data from earlier runs with the same data, tokenizer and settings "
        "($FTCTL_CACHE, default ~/.cache/ftctl)", group=DATA,
    )

    epochs: float = option(3.0, "training epochs", group=TRAIN)
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides --epochs)", group=TRAIN)
    batch_size: int = option(16, "global batch size (examples per optimizer step, all processes together)", group=TRAIN)
    micro_batch_size: int | None = option(
        None, "examples per forward pass per process (default: the global batch split over processes)", group=TRAIN
    )
    gradient_accumulation_steps: int | None = option(
        None, "accumulation steps (default: derived from --batch-size, --micro-batch-size and processes)", group=TRAIN
    )
    learning_rate: float | None = option(None, "peak learning rate (default: per method and task)", group=TRAIN)
    lr_scheduler: str = option("linear", "learning-rate schedule", choices=SCHEDULERS, group=TRAIN)
    warmup_ratio: float = option(0.06, "fraction of steps spent warming up the learning rate", group=TRAIN)
    warmup_steps: int | None = option(None, "warm-up steps (overrides --warmup-ratio)", group=TRAIN)
    weight_decay: float = option(0.01, "AdamW weight decay (not applied to biases and norms)", group=TRAIN)
    max_grad_norm: float = option(1.0, "gradient clipping norm", group=TRAIN)
    seed: int = option(42, "random seed (data split, shuffling, initialisation)", group=TRAIN)
    precision: str = option(
        "auto",
        "numeric precision; auto = bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16, AMX), "
        "else fp32",
        choices=PRECISIONS,
        group=TRAIN,
    )
    gradient_checkpointing: bool = option(False, "recompute activations to save memory", group=TRAIN)
    compile: bool = option(False, "torch.compile the model (pays off on long GPU runs)", group=TRAIN)
    liger_kernel: bool | None = option(
        None, "Liger Triton kernels (CUDA; default: on when liger-kernel is installed and a GPU is used)", group=TRAIN
    )
    group_by_length: bool = option(True, "batch examples of similar length together (less padding)", group=TRAIN)
    dataloader_workers: int = option(0, "data-loading worker processes", group=TRAIN)
    deepspeed: str | None = option(
        None, "DeepSpeed config: a name in ds_configs/ (zero1, zero2, zero2_offload_optimizer, zero3, "
        "zero3_offload_params_optimizer) or a JSON path", group=TRAIN,
    )
    ddp_timeout: int = option(
        1800, "seconds processes wait for each other (e.g. while the main process tokenizes a large dataset)",
        group=TRAIN,
    )

    eval_strategy: str = option("epoch", "when to evaluate on the validation data", choices=STRATEGIES, group=EVAL)
    eval_steps: int | None = option(None, "evaluate every N steps (with --eval-strategy steps)", group=EVAL)
    eval_on_start: bool = option(
        False, "also evaluate before the first step (the untrained starting point)", group=EVAL
    )
    eval_batch_size: int | None = option(
        None, "evaluation batch size per process (default: 2x the micro batch)", group=EVAL
    )
    save_strategy: str = option("epoch", "when to write a checkpoint", choices=STRATEGIES, group=EVAL)
    save_steps: int | None = option(None, "checkpoint every N steps (with --save-strategy steps)", group=EVAL)
    save_total_limit: int = option(2, "keep at most this many checkpoints (the best one is always kept)", group=EVAL)
    save_every: int | None = option(
        None, "checkpoint every N steps (and evaluate then, to pick the best): --save-strategy steps --save-steps N",
        group=EVAL,
    )
    keep_last: int | None = option(None, "keep the last K checkpoints (the best is kept too): --save-total-limit K",
                                   group=EVAL)
    logging_steps: int = option(10, "log the training loss every N steps", group=EVAL)
    early_stopping_patience: int | None = option(None, "stop after N evaluations without improvement", group=EVAL)
    metric_for_best_model: str | None = option(
        None, "metric that picks the best checkpoint (default: the task's main metric)", group=EVAL
    )
    load_best_model_at_end: bool = option(True, "finish with the best checkpoint, not the last one", group=EVAL)

    output_dir: str | None = option(None, "run directory (default: runs/<task>-<method>-<time>)", group=OUTPUT)
    overwrite: bool = option(False, "replace an existing, non-empty output directory", group=OUTPUT)
    resume: bool = option(False, "continue the run in --output-dir from its last checkpoint", group=OUTPUT)
    resume_from: str | None = option(None, "continue from this checkpoint directory", group=OUTPUT)
    report_to: list = option(
        ["tensorboard"], "logging integrations: tensorboard, none, or any the Trainer knows", group=OUTPUT
    )

    def validate(self) -> None:
        if self.save_every is not None:
            if self.save_every <= 0:
                raise FtctlError(f"--save-every must be greater than 0, got {self.save_every}")
            self.save_strategy, self.save_steps = "steps", self.save_every
            if self.load_best_model_at_end and self.eval_strategy != "no":
                self.eval_strategy, self.eval_steps = "steps", self.save_every
        if self.keep_last is not None:
            self.save_total_limit = self.keep_last
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "logging_steps": self.logging_steps,
            "max_steps": self.max_steps,
            "micro_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "max_train_samples": self.max_train_samples,
            "max_eval_samples": self.max_eval_samples,
            "eval_steps": self.eval_steps,
            "save_steps": self.save_steps,
            "eval_batch_size": self.eval_batch_size,
            "early_stopping_patience": self.early_stopping_patience,
            "save_total_limit": self.save_total_limit,
        }
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise FtctlError(f"--{name.replace('_', '-')} must be greater than 0, got {value}")
        if self.ddp_timeout <= 0:
            raise FtctlError(f"--ddp-timeout must be greater than 0 seconds, got {self.ddp_timeout}")
        for name in ("weight_decay", "max_grad_norm", "warmup_steps", "dataloader_workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise FtctlError(f"--{name.replace('_', '-')} must not be negative, got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise FtctlError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.validation_split < 1:
            raise FtctlError(f"--validation-split must be between 0 and 1, got {self.validation_split}")
        if self.max_length is not None and self.max_length < 8:
            raise FtctlError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        if self.eval_strategy == "steps" and not self.eval_steps:
            raise FtctlError("--eval-strategy steps needs --eval-steps N")
        if self.save_strategy == "steps" and not self.save_steps:
            raise FtctlError("--save-strategy steps needs --save-steps N")
        if self.early_stopping_patience and self.eval_strategy == "no":
            raise FtctlError("--early-stopping-patience needs evaluation: set --eval-strategy epoch or steps")
        if self.resume and self.overwrite:
            raise FtctlError("--resume and --overwrite contradict each other; pick one")
        if self.resume_from and self.overwrite:
            raise FtctlError("--resume-from and --overwrite contradict each other; pick one")
        if len(self.text_column) > 2:
            raise FtctlError(f"at most two --text-column values (a sentence pair), got {len(self.text_column)}")


RUN_SPECS: list[OptionSpec] = specs_of(RunConfig, owner="run", group="run")


@dataclass
class Resolved:
    """Everything a run is made of, resolved and checked."""

    cfg: RunConfig
    task: Any  # tasks.base.Task
    method: Any  # methods.base.Method
    explicit: list[str]  # option names the user set (file or flags)

    def flat(self) -> dict[str, Any]:
        """All option values, as one flat mapping with the same keys as the command-line options."""
        out = dataclasses.asdict(self.cfg)
        out.update(dataclasses.asdict(self.task.opts))
        out.update(dataclasses.asdict(self.method.opts))
        return out


def all_specs() -> dict[str, OptionSpec]:
    """Every option of the run, of every registered task and of every registered method."""
    from methods import METHODS
    from tasks import TASKS

    return merge_specs(
        RUN_SPECS,
        *(spec.option_specs() for _, spec in TASKS.items()),
        *(spec.option_specs() for _, spec in METHODS.items()),
    )


def build_parser(prog: str) -> Parser:
    parser = Parser(
        prog=prog,
        description="Fine-tune a transformer on a task with a method. Every option can also be a key in --config FILE.",
        epilog="Options of one task or method apply only when that task or method is chosen.",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are these options; flags win")
    add_options(parser, all_specs().values())
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FtctlError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise FtctlError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FtctlError(f"config file {path} must be a mapping of option: value, got a {type(data).__name__}")
    return data


def _user_values(argv: list[str], prog: str) -> tuple[dict[str, Any], dict[str, OptionSpec]]:
    specs = all_specs()
    cli = build_parser(prog).parse_strict(argv)
    values: dict[str, Any] = {}
    config_path = cli.pop("config", None)
    if config_path:
        for key, value in load_yaml(config_path).items():
            name = str(key).replace("-", "_")
            if name not in specs:
                raise FtctlError(
                    f"unknown key '{key}' in {config_path}{suggest(name, specs)}; keys are the option names"
                )
            values[name] = coerce(specs[name], value, f"key '{key}' in {config_path}")
    values.update(cli)
    return values, specs


def resolve(argv: list[str], prog: str) -> Resolved:
    """Parse the command line (and --config file) into a checked run description."""
    user, specs = _user_values(argv, prog)
    return resolve_values(user, specs)


def resolve_values(user: dict[str, Any], specs: dict[str, OptionSpec] | None = None) -> Resolved:
    """Resolve explicit option values (as from a YAML file or `run.json`) with every default layer."""
    from methods import METHODS
    from tasks import TASKS

    specs = specs or all_specs()
    task_name = user.get("task")
    if not task_name:
        raise FtctlError(f"no task given: pass --task NAME; tasks: {', '.join(TASKS)}")
    task_spec = TASKS.get(task_name)
    method_spec = METHODS.get(user.get("method") or RunConfig.method)

    task_names = {s.name for s in task_spec.option_specs()}
    method_names = {s.name for s in method_spec.option_specs()}
    run_names = {s.name for s in RUN_SPECS}
    for name in user:
        if name not in run_names | task_names | method_names:
            owners = [n for n, s in METHODS.items() if name in {o.name for o in s.option_specs()}]
            owners += [n for n, s in TASKS.items() if name in {o.name for o in s.option_specs()}]
            raise FtctlError(
                f"{specs[name].flag} does not apply to task '{task_name}' with method "
                f"'{user.get('method') or RunConfig.method}'; it belongs to: {', '.join(owners)}"
            )

    # a method's defaults for the task kind may set run options (learning rate, epochs) and its own options
    method_defaults = method_spec.run_defaults(task_spec.kind)
    values = {s.name: s.default for s in RUN_SPECS}
    values.update(task_spec.run_defaults())
    values.update({k: v for k, v in method_defaults.items() if k in run_names})
    values.update({k: v for k, v in user.items() if k in run_names})
    cfg = RunConfig(**values)
    cfg.validate()

    task = task_spec.create(cfg, {k: v for k, v in user.items() if k in task_names})
    method_values = {k: v for k, v in method_defaults.items() if k in method_names}
    method_values.update({k: v for k, v in user.items() if k in method_names})
    method = method_spec.create(method_values)
    return Resolved(cfg=cfg, task=task, method=method, explicit=sorted(user))


def default_output_dir(cfg: RunConfig) -> str:
    import time

    return os.path.join("runs", f"{cfg.task}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
