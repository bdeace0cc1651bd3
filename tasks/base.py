"""The task interface and registry.

A task owns the data (reading, checking, splitting, tokenizing, batching), the model class and head, which head
modules stay trainable and get saved, and how predictions become metrics. It knows nothing of methods, launchers or
the training loop. A task registers one class under all of its preset names (`sst2`, `imdb`, ... are presets of
`classification`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import datasets
import numpy as np
import torch
from transformers import DataCollatorWithPadding, PretrainedConfig, PreTrainedTokenizerBase

from ftctl import dataio
from ftctl.config import RunConfig
from ftctl.errors import FtctlError
from ftctl.models import from_pretrained
from ftctl.options import OptionSpec, specs_of
from ftctl.registry import Registry
from ftctl.vocab import FAMILIES, Family, TaskKind
from tasks._views import DetailView, RowView

BUNDLED_DATA = Path(__file__).parent / "data"
FRESH_MODULES = "ftctl_fresh_modules"  # attribute of a loaded model: modules its checkpoint lacked
# batch keys holding the prompt to generate from (decoders: tasks/_generation.py), not model inputs
GENERATION_PREFIX = "generation_"


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


@dataclass(frozen=True)
class ModelFit:
    """What `check_model` found out about the backbone, as the task uses it: which Auto class and PEFT task type
    load it, its pipeline tag, and whether its loss sums over label items (family-dependent for generation tasks)."""

    family: Family
    model_type: str
    auto_model: str
    peft_task_type: str
    pipeline_tag: str
    # The loss sums over label items and divides by `num_items_in_batch` (exact token-level normalisation across
    # micro-batches and processes); False: the model's loss is a per-micro-batch mean (see FtctlTrainer).
    loss_counts_items: bool = False


@dataclass(frozen=True)
class LoadedData:
    """The splits a task read, and where from (for messages and run.json)."""

    splits: dict[str, datasets.Dataset]
    source: str


# ---- optional capabilities: a task implements the protocol when it has the behaviour ---------------------------
@runtime_checkable
class SamplesGenerations(Protocol):
    """Scored without generating (e.g. by perplexity), yet shows what the model writes for its first examples."""

    def sample_count(self) -> int: ...

    def add_samples(self, predictions: Any, generated: Any) -> Any: ...


@runtime_checkable
class TrainsOnOtherBatches(Protocol):
    """Training batches differ from evaluation batches (padding-free packing for decoders)."""

    def train_collator(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> Any: ...


@runtime_checkable
class ScoresTexts(Protocol):
    """Outputs are texts, scored by a function of (predictions, references): per example in reports."""

    def score_texts(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]: ...


@runtime_checkable
class ExampleStatistics(Protocol):
    """Metrics recomputable from the predictions file: each row becomes a vector of additive statistics, and the
    task's metrics are a function of their sums (tasks/_statistics.py). Reports resample evaluation examples with
    it (bootstrap intervals, paired comparisons), corpus-level metrics included. Both hooks are classmethods that
    read only their arguments (`state` is the run's recorded task state): a report calls them on the task class."""

    @classmethod
    def example_statistics(cls, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray: ...

    @classmethod
    def metrics_from_totals(cls, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class Prompted(Protocol):
    """Reads prompts (tasks/_prompts.py): a run records their format and its first example as the model read it."""

    def prompt_record(self, example: dict[str, Any]) -> dict[str, Any]: ...

    def few_shot(self, train: datasets.Dataset, k: int, seed: int) -> tuple[Any, ...]: ...


@runtime_checkable
class TakesText(Protocol):
    """Writes text from a free-form input (`ftctl generate RUN --prompt TEXT`): the input as one of its examples."""

    def example_from_text(self, text: str, context: str | None = None) -> dict[str, Any]: ...


@runtime_checkable
class ScoresChoices(Protocol):
    """Besides generating, scores a fixed set of answers (label words) by their log-likelihood after the prompt: the
    way evaluation harnesses score multiple choice. The engine calls it on each evaluation batch with the model."""

    def choice_scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


@runtime_checkable
class ReportsDetails(Protocol):
    """Evaluation details (metric_details) that a report can draw."""

    @classmethod
    def report_details(cls, details: Mapping[str, Any]) -> list[DetailView]: ...


class Task:
    """A task, configured (`cfg`, `opts`, preset) and, once the run has checked them, bound to what it learned:
    `fit` (from `check_model`), `state` (from `check_data`: label names, ...) and the prepared tokenizer. Binding
    returns a new task (`bind`); nothing learned is written onto an existing instance."""

    name: ClassVar[str]
    kind: ClassVar[TaskKind]  # what methods tune their defaults by
    description: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    families: ClassVar[tuple[Family, ...]] = FAMILIES
    peft_task_type: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    presets: ClassVar[dict[str, Preset]]
    defaults: ClassVar[dict[str, Any]] = {}  # run option defaults (e.g. max_length)
    has_head: ClassVar[bool] = True  # a separate head on top of the backbone (not a language-model task)
    auto_model: ClassVar[str]  # the transformers Auto class that loads the fine-tuned model
    pipeline_tag: ClassVar[str]  # the hub's pipeline tag, for the model card
    # encoded columns kept for scoring (offsets, gold references, example ids); never handed to the model
    extra_columns: ClassVar[tuple[str, ...]] = ()
    generates: ClassVar[bool] = False  # evaluation predictions are generated token ids (see `generation_kwargs`)

    def __init__(self, cfg: RunConfig, opts: Any, preset_name: str):
        self.cfg = cfg
        self.opts = opts
        self.preset_name = preset_name
        self.preset = self.presets[preset_name]
        self._fit: ModelFit | None = None
        self.state: Mapping[str, Any] = {}  # what the task learned from the data (label names, ...); saved with the run
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.shots: tuple[Any, ...] = ()  # solved examples a prompted task puts before each query (few-shot)

    def bind(
        self,
        fit: ModelFit | None = None,
        state: Mapping[str, Any] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        shots: tuple[Any, ...] | None = None,
    ) -> Task:
        """A copy of this task that carries what the run learned (the values returned by `check_model` and
        `check_data`, and the prepared tokenizer)."""
        bound = copy.copy(self)
        bound._fit = fit if fit is not None else self._fit
        bound.state = dict(state) if state is not None else self.state
        bound.shots = tuple(shots) if shots is not None else self.shots
        bound.tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        return bound

    @property
    def fit(self) -> ModelFit:
        if self._fit is None:
            raise RuntimeError(f"task '{self.preset_name}' is not bound to a model yet (bind(fit=check_model(...)))")
        return self._fit

    # ---- data -------------------------------------------------------------------------------------------------
    def load(self) -> LoadedData:
        """Train/validation(/test) splits: from files, a hub id, the bundled demo data or the preset's hub dataset."""
        cfg = self.cfg
        files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
        if any(files.values()):
            if not cfg.train_file:
                raise FtctlError("--validation-file/--test-file given without --train-file; training needs train data")
            wanted = ("train",) if cfg.validation_from_train else tuple(files)
            splits = {
                name: self.read_file(path, f"{name} file") for name, path in files.items() if path and name in wanted
            }
            source = ", ".join(f"{n}={p}" for n, p in files.items() if p and n in wanted)
        elif cfg.dataset:
            splits = dataio.load_hub(cfg.dataset, cfg.dataset_config)
            source = f"hub:{cfg.dataset}" + (f"/{cfg.dataset_config}" if cfg.dataset_config else "")
        elif self.preset.bundled:
            folder = BUNDLED_DATA / self.preset.bundled
            splits = {p.stem: self.read_file(str(p), "bundled data") for p in sorted(folder.glob("*.jsonl"))}
            source = f"bundled:{self.preset.bundled}"
        elif self.preset.hub:
            splits = dataio.load_hub(*self.preset.hub)
            source = f"hub:{self.preset.hub[0]}" + (f"/{self.preset.hub[1]}" if self.preset.hub[1] else "")
        else:
            raise FtctlError(
                f"task '{self.preset_name}' needs data: pass --train-file (CSV, TSV, JSON, JSONL or Parquet) "
                "or --dataset HUB_ID"
            )
        if "train" not in splits:
            raise FtctlError(f"the data from {source} has no train split")
        splits = self.clean(splits)
        if self.cfg.validation_from_train:  # a search trial: the data's own evaluation splits stay unread
            splits = {"train": splits["train"]}
            source += " (validation carved from train)"
        if "validation" not in splits:
            pool, fraction = held_out_pool(splits["train"], self.cfg.max_train_samples, self.cfg.validation_split)
            splits["train"], splits["validation"] = self.split_off(pool, fraction)
        return LoadedData(self.cap(splits), source)

    def read_file(self, path: str, what: str) -> datasets.Dataset:
        return dataio.read_table(path, what)

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

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> Mapping[str, Any]:
        """Refuse data the task cannot use (missing columns, bad labels). Returns the task's state: learnt from the
        train data when `training`, else this task's own (bound) state, against which the splits were checked."""
        raise NotImplementedError

    # ---- inference on unlabelled data (`ftctl predict`) ---------------------------------------------------------
    # the fields of a prediction row that describe the gold answer: left out of what `predict` writes
    gold_fields: ClassVar[tuple[str, ...]] = ()
    # how a report reads the prediction rows: whether one is right, what to show of it
    row_view: ClassVar[RowView] = RowView()

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        """Inputs without answers, made encodable: a placeholder answer where the data has none. The placeholder is
        never shown (`gold_fields` are left out) and never reaches the model (scoring runs on the inputs alone)."""
        return ds

    def with_options(self, **changes: Any) -> Task:
        """A copy whose task options differ (e.g. `predict` asking an instruction task to answer every prompt)."""
        changed = copy.copy(self)
        changed.opts = dataclasses.replace(self.opts, **changes)
        return changed

    def with_column(self, ds: datasets.Dataset, column: str | None, value: Any) -> datasets.Dataset:
        """`ds` with `column` added as `value` in every row, where it is missing."""
        if not column or column in ds.column_names:
            return ds
        return ds.add_column(column, [value] * len(ds))

    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
        """Tokenize one split; the result holds model inputs, labels and a `length` column. Pure and batched."""
        raise NotImplementedError

    def collator(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> Any:
        """Pads a batch to its longest member (dynamic padding)."""
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    # ---- model ------------------------------------------------------------------------------------------------
    def check_model(self, model_config: PretrainedConfig, family: Family) -> ModelFit:
        """Refuse a backbone the task cannot use; returns how the task fits it."""
        if family not in self.families:
            raise FtctlError(
                f"task '{self.preset_name}' does not support {family} models like '{model_config.model_type}'; "
                f"it supports: {', '.join(self.families)}"
            )
        return ModelFit(family, model_config.model_type, self.auto_model, self.peft_task_type, self.pipeline_tag)

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase, family: Family) -> None:
        """Give decoders a pad token (their own end-of-sequence token, which classification never predicts)."""
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise FtctlError("the tokenizer has neither a pad nor an end-of-sequence token to pad with")
            tokenizer.pad_token = tokenizer.eos_token

    def load_args(self, model_config: PretrainedConfig) -> dict[str, Any]:
        """Arguments a user passes to `auto_model.from_pretrained(base, ...)` to put an adapter back on the base."""
        return {}

    def pad_arg(self, model_config: PretrainedConfig) -> dict[str, int]:
        """The pad id a sequence-level head reads the last real token by: the base's own, else the one `build_model`
        set from the prepared tokenizer (GPT-2 and Llama checkpoints have none)."""
        pad = getattr(model_config, "pad_token_id", None)
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
        return {"pad_token_id": pad} if pad is not None else {}

    def build_model(self, ref: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]) -> torch.nn.Module:
        raise NotImplementedError

    def load_pretrained(self, auto_cls: Any, ref: str, **kwargs: Any) -> torch.nn.Module:
        """Load weights; the model remembers which modules its checkpoint did not have (freshly initialised), for
        `head_modules`."""
        model, info = from_pretrained(auto_cls, ref, output_loading_info=True, **kwargs)
        setattr(model, FRESH_MODULES, sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", ())}))
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
        fresh = [m for m in fresh_modules(model) if not any(m == h or m.startswith(h + ".") for h in heads)]
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

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        """One JSON-able row per example for predictions.jsonl."""
        raise NotImplementedError


@dataclass(frozen=True)
class TaskSpec:
    """What the registry holds for one name: the task class and which preset the name selects."""

    cls: type[Task]
    preset_name: str

    @property
    def kind(self) -> TaskKind:
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


HELD_OUT_FLOOR = 100  # held-out examples a sampled run is scored on at least (when the data has them)


def held_out_pool(train: datasets.Dataset, max_train: int | None, fraction: float) -> tuple[datasets.Dataset, float]:
    """What the validation split is carved from, and the fraction to carve. Without --max-train-samples: all of the
    training data, `fraction` of it. With N sampled: the first N + V rows, V in proportion to the sample (V / (N + V)
    = fraction) but at least HELD_OUT_FLOOR (or what the data has beyond N), so a 200-example run of a 67k-row file
    is scored on about 100 held-out examples at each evaluation, not on 6,700."""
    if not max_train or len(train) <= max_train:
        return train, fraction
    wanted = max(HELD_OUT_FLOOR, round(max_train * fraction / (1 - fraction)))
    held_out = min(len(train) - max_train, wanted)
    return train.select(range(max_train + held_out)), held_out / (max_train + held_out)


def fresh_modules(model: torch.nn.Module) -> list[str]:
    """Modules the model's checkpoint did not have (see `Task.load_pretrained`)."""
    return list(getattr(model, FRESH_MODULES, []))


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a task under each of its preset names."""
    for preset_name in cls.presets:
        TASKS.add(preset_name, TaskSpec(cls, preset_name))
    return cls
