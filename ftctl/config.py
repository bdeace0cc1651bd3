"""The general run options, shared by every task and method: one declaration per option (`ftctl.options`), which
serves the YAML loader, the command line, `--help` and `run.json`. Resolution (defaults, presets, files, flags) is the
run layer's (`launch.run.config`); a RunConfig checks its own values when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftctl.errors import FtctlError
from ftctl.options import OptionSpec, option, specs_of

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
        0.1,
        "fraction of the train data held out for validation when no validation data is given; with "
        "--max-train-samples N, held out beside the N examples in that proportion, at least 100 examples (the data "
        "allowing); evaluations during training score it, and `ftctl evaluate` the test split if any, else it",
        group=DATA,
    )
    validation_from_train: bool = option(
        False,
        "carve the validation split from the train data even when the data has validation or test splits, which are "
        "then not used (how a grid's search trials are scored: never on the evaluation data)",
        group=DATA,
    )
    max_length: int | None = option(None, "truncate inputs to this many tokens (default: per task)", group=DATA)
    token_cache: bool = option(
        True,
        "reuse tokenized data from earlier runs with the same data, tokenizer and settings "
        "($FTCTL_CACHE, default ~/.cache/ftctl)",
        group=DATA,
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
    plan: bool = option(
        True,
        "predict peak memory and time before loading weights, and record them beside the measured ones (ftctl plan; "
        "not under DeepSpeed)",
        group=TRAIN,
    )
    liger_kernel: bool | None = option(
        None, "Liger Triton kernels (CUDA; default: on when liger-kernel is installed and a GPU is used)", group=TRAIN
    )
    group_by_length: bool = option(True, "batch examples of similar length together (less padding)", group=TRAIN)
    dataloader_workers: int = option(0, "data-loading worker processes", group=TRAIN)
    deepspeed: str | None = option(
        None,
        "DeepSpeed config: a name in ds_configs/ (zero1, zero2, zero2_offload_optimizer, zero3, "
        "zero3_offload_params_optimizer) or a JSON path",
        group=TRAIN,
    )
    ddp_timeout: int = option(
        1800,
        "seconds processes wait for each other (e.g. while the main process tokenizes a large dataset)",
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
        None,
        "checkpoint every N steps (and evaluate then, to pick the best): --save-strategy steps --save-steps N",
        group=EVAL,
    )
    keep_last: int | None = option(
        None, "keep the last K checkpoints (the best is kept too): --save-total-limit K", group=EVAL
    )
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

    def __post_init__(self) -> None:
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
        if not 0 <= self.seed < 2**32:  # numpy's and torch's seeds are unsigned 32-bit
            raise FtctlError(f"--seed must be between 0 and {2**32 - 1}, got {self.seed}")
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
        if self.dataset and (self.train_file or self.validation_file or self.test_file):
            raise FtctlError(
                f"--dataset {self.dataset} and --train-file/--validation-file/--test-file both name the data; "
                "give one of them"
            )
        if self.resume and self.overwrite:
            raise FtctlError("--resume and --overwrite contradict each other; pick one")
        if self.resume_from and self.overwrite:
            raise FtctlError("--resume-from and --overwrite contradict each other; pick one")
        if self.output_dir is not None and not self.output_dir.strip():
            raise FtctlError("--output-dir is empty; give a directory, or leave it out for runs/<task>-<method>-<time>")
        if self.label_column and self.label_column in self.text_column:
            raise FtctlError(
                f"--text-column and --label-column are both '{self.label_column}': the model would read its own label "
                "(a label leak); choose the column that holds the text"
            )
        if len(self.text_column) > 2:
            raise FtctlError(f"at most two --text-column values (a sentence pair), got {len(self.text_column)}")


RUN_SPECS: list[OptionSpec] = specs_of(RunConfig, owner="run", group="run")


def with_aliases(values: dict[str, Any]) -> dict[str, Any]:
    """Option values with the shorthand options spelt out: `--save-every N` is `--save-strategy steps --save-steps N`
    (and evaluation at the same steps, to pick the best checkpoint), `--keep-last K` is `--save-total-limit K`."""
    out = dict(values)
    save_every, keep_last = out.get("save_every"), out.get("keep_last")
    if save_every is not None:
        if save_every <= 0:
            raise FtctlError(f"--save-every must be greater than 0, got {save_every}")
        out["save_strategy"], out["save_steps"] = "steps", save_every
        if out.get("load_best_model_at_end", True) and out.get("eval_strategy", "epoch") != "no":
            out["eval_strategy"], out["eval_steps"] = "steps", save_every
    if keep_last is not None:
        out["save_total_limit"] = keep_last
    return out
