"""The task interface and registry.

A task owns the data (reading, checking, splitting, tokenizing, batching), the model class and head, which head
modules stay trainable and get saved, and how predictions become metrics. It knows nothing of methods, launchers or
the training loop. A task registers one class under all of its preset names (`sst2`, `imdb`, ... are presets of
`classification`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from launch.errors import FtctlError
from launch.options import OptionSpec, specs_of
from launch.registry import Registry
from tasks import io

if TYPE_CHECKING:
    import datasets
    import torch

    from launch.config import RunConfig

FAMILIES = ("encoder", "decoder", "encoder-decoder")
BUNDLED_DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Preset:
    """A named dataset setting of a task."""

    description: str
    hub: tuple[str, str | None] | None = None  # (dataset id, config) loaded for users online
    bundled: str | None = None  # folder under tasks/data used when no data is given (offline demo)
    values: dict[str, Any] = field(default_factory=dict)  # option defaults (columns, max length, ...)
    facts: dict[str, Any] = field(default_factory=dict)  # task-specific facts (label names, ...)


@dataclass
class NoOptions:
    pass


class Task:
    name: ClassVar[str]
    kind: ClassVar[str]  # what methods tune their defaults by: classification, regression, tokens, qa, generation
    description: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    greater_is_better: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = FAMILIES
    peft_task_type: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    presets: ClassVar[dict[str, Preset]]
    defaults: ClassVar[dict[str, Any]] = {}  # run option defaults (e.g. max_length)
    has_head: ClassVar[bool] = True  # a separate head on top of the backbone (not a language-model task)
    auto_model: ClassVar[str]  # the transformers Auto class that loads the fine-tuned model
    pipeline_tag: ClassVar[str]  # the hub's pipeline tag, for the model card
    target_keys: ClassVar[tuple[str, ...]] = ("labels",)  # batch keys holding the targets (QA: start/end positions)
    # encoded columns kept for scoring (offsets, gold references, example ids); never handed to the model
    extra_columns: ClassVar[tuple[str, ...]] = ()
    # The loss sums over label items and divides by `num_items_in_batch` (exact token-level normalisation across
    # micro-batches and processes); False: the model's loss is a per-micro-batch mean (see FtctlTrainer).
    loss_counts_items: ClassVar[bool] = False
    generates: ClassVar[bool] = False  # evaluation predictions are generated token ids (see `generation_kwargs`)
    samples: int = 0  # tasks scored without generating: also generate outputs for this many examples at the end

    def __init__(self, cfg: RunConfig, opts: Any, preset_name: str):
        self.cfg = cfg
        self.opts = opts
        self.preset_name = preset_name
        self.preset = self.presets[preset_name]
        self.state: dict[str, Any] = {}  # what the task learned from the data (label names, ...); saved with the run
        self.data_source = ""
        self.new_modules: list[str] = []  # modules the checkpoint lacked, set by load_pretrained

    # ---- data -------------------------------------------------------------------------------------------------
    def load(self) -> dict[str, datasets.Dataset]:
        """Train/validation(/test) splits: from files, a hub id, the bundled demo data or the preset's hub dataset."""
        cfg = self.cfg
        files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
        if any(files.values()):
            if not cfg.train_file:
                raise FtctlError("--validation-file/--test-file given without --train-file; training needs train data")
            splits = {name: self.read_file(path, f"{name} file") for name, path in files.items() if path}
            self.data_source = ", ".join(f"{n}={p}" for n, p in files.items() if p)
        elif cfg.dataset:
            splits = io.load_hub(cfg.dataset, cfg.dataset_config)
            self.data_source = f"hub:{cfg.dataset}" + (f"/{cfg.dataset_config}" if cfg.dataset_config else "")
        elif self.preset.bundled:
            folder = BUNDLED_DATA / self.preset.bundled
            splits = {p.stem: self.read_file(str(p), "bundled data") for p in sorted(folder.glob("*.jsonl"))}
            self.data_source = f"bundled:{self.preset.bundled}"
        elif self.preset.hub:
            splits = io.load_hub(*self.preset.hub)
            self.data_source = f"hub:{self.preset.hub[0]}" + (f"/{self.preset.hub[1]}" if self.preset.hub[1] else "")
        else:
            raise FtctlError(
                f"task '{self.preset_name}' needs data: pass --train-file (CSV, TSV, JSON, JSONL or Parquet) "
                "or --dataset HUB_ID"
            )
        if "train" not in splits:
            raise FtctlError(f"the data from {self.data_source} has no train split")
        splits = self.clean(splits)
        if "validation" not in splits:
            splits["train"], splits["validation"] = self.split_off(splits["train"], self.cfg.validation_split)
        return self.cap(splits)

    def read_file(self, path: str, what: str) -> datasets.Dataset:
        return io.read_table(path, what)

    def clean(self, splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        """Drop what cannot be used (e.g. a hub test split without labels). Default: nothing."""
        return splits

    def split_off(self, train: datasets.Dataset, fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
        """Hold out a seeded validation split from the training data."""
        if len(train) < 2:
            raise FtctlError(f"the train data has {len(train)} example(s); need at least 2 to hold out validation data")
        parts = train.train_test_split(test_size=fraction, seed=self.cfg.seed)
        return parts["train"], parts["test"]

    def cap(self, splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        limits = {
            "train": self.cfg.max_train_samples,
            "validation": self.cfg.max_eval_samples,
            "test": self.cfg.max_eval_samples,
        }
        return {n: ds.select(range(min(len(ds), limits[n]))) if limits.get(n) else ds for n, ds in splits.items()}

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> None:
        """Refuse data the task cannot use (missing columns, bad labels); learn `self.state` from train data."""
        raise NotImplementedError

    def encode(self, ds: datasets.Dataset, tokenizer: Any) -> datasets.Dataset:
        """Tokenize one split; the result holds model inputs, labels and a `length` column. Pure and batched."""
        raise NotImplementedError

    def collator(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> Any:
        """Pads a batch to its longest member (dynamic padding)."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def train_collator(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> Any:
        """Batches for training; the evaluation batches of `collator` unless the task packs (see generation.py)."""
        return self.collator(tokenizer, pad_to_multiple_of)

    # ---- model ------------------------------------------------------------------------------------------------
    def check_model(self, model_config: Any, family: str) -> None:
        if family not in self.families:
            raise FtctlError(
                f"task '{self.preset_name}' does not support {family} models like '{model_config.model_type}'; "
                f"it supports: {', '.join(self.families)}"
            )

    def prepare_tokenizer(self, tokenizer: Any, family: str) -> None:
        """Give decoders a pad token (their own end-of-sequence token, which classification never predicts)."""
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise FtctlError("the tokenizer has neither a pad nor an end-of-sequence token to pad with")
            tokenizer.pad_token = tokenizer.eos_token

    def load_args(self, model_config: Any) -> dict[str, Any]:
        """Arguments a user passes to `auto_model.from_pretrained(base, ...)` to put an adapter back on the base."""
        return {}

    def build_model(self, ref: str, tokenizer: Any, load_kwargs: dict[str, Any]) -> torch.nn.Module:
        raise NotImplementedError

    def load_pretrained(self, auto_cls: Any, ref: str, **kwargs: Any) -> torch.nn.Module:
        """Load weights, remembering which modules the checkpoint did not have (freshly initialised)."""
        from launch.models import from_pretrained

        model, info = from_pretrained(auto_cls, ref, output_loading_info=True, **kwargs)
        self.new_modules = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", ())})
        return model

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Modules that must train and be saved with any method: the model's top-level children outside the
        pretrained backbone (classifier, score, qa_outputs), plus anything the checkpoint lacked (e.g. a BERT pooler
        missing from a masked-LM checkpoint), which would otherwise stay random."""
        backbone = getattr(model, model.base_model_prefix, None)
        heads = [
            name
            for name, child in model.named_children()
            if child is not backbone and any(True for _ in child.parameters())
        ]
        fresh = [m for m in self.new_modules if not any(m == h or m.startswith(h + ".") for h in heads)]
        return heads + fresh

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def generation_kwargs(self) -> dict[str, Any]:
        """`model.generate` arguments for evaluation (tasks that generate)."""
        return {}

    def reduce_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Shrink model outputs on the device before they are gathered (e.g. argmax)."""
        return logits

    def compute_metrics(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        """Metrics from predictions in the order of `encoded` (the evaluated split)."""
        raise NotImplementedError

    def metric_details(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        """Non-scalar analysis for the final evaluation (per-class report, confusion matrix, ...)."""
        return {}

    def example_predictions(self, predictions: Any, encoded: datasets.Dataset) -> Any:
        """Per-example predictions from per-row ones, both in `encoded`'s order. Rows are examples for most tasks;
        where they are not (QA windows), `encoded` carries the row-to-example mapping and this decodes it."""
        return predictions

    def add_samples(self, predictions: Any, generated: Any) -> Any:
        """Attach the generated outputs of the first `samples` examples to the per-example predictions."""
        return predictions

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        """One JSON-able row per example for predictions.jsonl."""
        raise NotImplementedError


@dataclass(frozen=True)
class TaskSpec:
    """What the registry holds for one name: the task class and which preset the name selects."""

    cls: type[Task]
    preset_name: str

    @property
    def kind(self) -> str:
        return self.cls.kind

    @property
    def preset(self) -> Preset:
        return self.cls.presets[self.preset_name]

    def option_specs(self) -> list[OptionSpec]:
        return specs_of(self.cls.Options, owner=f"task {self.cls.name}", group=f"{self.cls.name} task options")

    def run_defaults(self) -> dict[str, Any]:
        return {**self.cls.defaults, **self.preset.values}

    def create(self, cfg: RunConfig, user_opts: dict[str, Any]) -> Task:
        opts = self.cls.Options(**user_opts)
        if hasattr(opts, "validate"):
            opts.validate()
        return self.cls(cfg, opts, self.preset_name)


TASKS: Registry[TaskSpec] = Registry("task")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a task under each of its preset names."""
    for preset_name in cls.presets:
        TASKS.add(preset_name, TaskSpec(cls, preset_name))
    return cls
