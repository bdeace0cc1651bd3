"""Sentence-pair similarity as regression (STS-B): one output, mean squared error, Pearson and Spearman correlation.

Data: the GLUE STS-B TSV (`sentence1`, `sentence2`, `score` 0-5), pair CSV/JSON/JSONL files, or a hub dataset (the
GLUE copy calls the score `label`, which is used when the configured column is absent). Scores must be numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from ftctl.errors import FtctlError
from ftctl.vocab import Family, TaskKind
from tasks import _statistics as statistics
from tasks.base import Preset, RowView, Task, register_task

if TYPE_CHECKING:  # annotations only
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


def _score(value: Any, split: str, column: str, row: int) -> float:
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise FtctlError(
            f"{split} data: row {row + 1} has a non-numeric score {value!r} in column '{column}'; similarity "
            "regression needs numbers (for class labels use --task classification)"
        ) from None
    if math.isnan(number):
        raise FtctlError(f"{split} data: row {row + 1} has no score in column '{column}'")
    return number


@register_task
class SentenceSimilarityTask(Task):
    name = "sentence-similarity"
    kind = TaskKind.REGRESSION
    description = "score how similar two sentences are (regression)"
    metrics = ("pearson", "spearman", "mse")
    primary_metric = "pearson"
    families = (Family.ENCODER, Family.DECODER)
    peft_task_type = "SEQ_CLS"
    auto_model = "AutoModelForSequenceClassification"
    pipeline_tag = "text-classification"
    defaults = {"max_length": 128}
    presets = {
        "stsb": Preset(
            "STS-B sentence-pair similarity, scores 0-5 (GLUE TSV or pair CSV/JSON files)",
            hub=("nyu-mll/glue", "stsb"),
            values={"text_column": ["sentence1", "sentence2"], "label_column": "score"},
        ),
    }

    # ---- data -------------------------------------------------------------------------------------------------
    def clean(self, splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        column = self.cfg.label_column
        for name, ds in list(splits.items()):
            if column not in ds.column_names and "label" in ds.column_names:
                ds = splits[name] = ds.rename_column("label", column)
            if name == "test" and column in ds.column_names and all(_is_hidden(v) for v in ds[column][:1000]):
                del splits[name]  # GLUE's hidden test scores (-1): nothing to score against
        return splits

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> Mapping[str, Any]:
        columns = list(self.cfg.text_column)
        if len(columns) != 2:
            raise FtctlError(
                f"sentence similarity compares two texts: give --text-column twice (got {len(columns)} column(s))"
            )
        if not self.cfg.label_column:
            raise FtctlError("no score column given: pass --label-column NAME")
        for split, ds in splits.items():
            if len(ds) == 0:
                raise FtctlError(f"{split} data has no examples")
            for column in [*columns, self.cfg.label_column]:
                if column not in ds.column_names:
                    flag = "--label-column" if column == self.cfg.label_column else "--text-column"
                    raise FtctlError(
                        f"{split} data has no column '{column}'; columns found: {', '.join(ds.column_names)} "
                        f"(choose with {flag})"
                    )
            for column in columns:
                for i, text in enumerate(ds[column]):
                    if text is None:
                        raise FtctlError(f"{split} data: row {i + 1} has no text in column '{column}'")
            scores = [_score(v, split, self.cfg.label_column, i) for i, v in enumerate(ds[self.cfg.label_column])]
            if training and split == "train" and len(set(scores)) < 2:
                raise FtctlError(f"every train score is {scores[0]}; regression needs varied scores")
        return {}

    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
        first, second = self.cfg.text_column
        column = self.cfg.label_column
        max_length = min(self.cfg.max_length, tokenizer.model_max_length or self.cfg.max_length)

        def encode_batch(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(
                [str(t) for t in batch[first]], [str(t) for t in batch[second]], truncation=True, max_length=max_length
            )
            enc["labels"] = [_score(v, "data", column, i) for i, v in enumerate(batch[column])]
            enc["length"] = [len(x) for x in enc["input_ids"]]
            return enc

        return ds.map(encode_batch, batched=True, remove_columns=ds.column_names, desc="tokenizing")

    # ---- model ------------------------------------------------------------------------------------------------
    def load_args(self, model_config: PretrainedConfig) -> dict[str, Any]:
        args: dict[str, Any] = {"num_labels": 1, "problem_type": "regression"}
        return {**args, **self.pad_arg(model_config)}

    def build_model(self, ref: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]) -> torch.nn.Module:
        model = self.load_pretrained(
            AutoModelForSequenceClassification, ref, num_labels=1, problem_type="regression", **load_kwargs
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """The regressor, plus the BERT-style pooler it reads (untrained in sentence-embedding checkpoints)."""
        heads = super().head_modules(model)
        prefix = model.base_model_prefix
        pooler = getattr(getattr(model, prefix, None), "pooler", None)
        if pooler is not None and any(True for _ in pooler.parameters()):
            name = f"{prefix}.pooler"
            heads = [name] + [h for h in heads if not h.startswith(name + ".")]
        return heads

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def reduce_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.float().reshape(-1)

    def compute_metrics(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        # deferred: a heavy import (seconds), paid only by the runs that use it
        from scipy.stats import pearsonr, spearmanr

        predicted, gold = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float)
        constant = np.ptp(predicted) == 0 or np.ptp(gold) == 0  # correlation undefined: report 0, not NaN
        return {
            "pearson": 0.0 if constant else float(pearsonr(predicted, gold)[0]),
            "spearman": 0.0 if constant else float(spearmanr(predicted, gold)[0]),
            "mse": float(np.mean((predicted - gold) ** 2)),
        }

    # ---- statistics for reports (tasks/_statistics.py): Pearson's r and the MSE; Spearman's rho ranks the whole
    # evaluation set and has no additive form, so it gets no resampled interval ------------------------------------
    @classmethod
    def example_statistics(cls, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray:
        return statistics.moment_statistics([r["prediction"] for r in rows], [r["label"] for r in rows])

    @classmethod
    def metrics_from_totals(cls, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return statistics.moment_metrics(totals)

    gold_fields = ("label",)
    row_view = RowView(None, ("text",), "label")

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        return self.with_column(ds, self.cfg.label_column, 0.0)

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        first, second = self.cfg.text_column
        column = self.cfg.label_column
        return [
            {
                "index": i,
                "text": example[first],
                "text_pair": example[second],
                "label": _score(example[column], "data", column, i),
                "prediction": float(predictions[i]),
            }
            for i, example in enumerate(raw)
        ]


def _is_hidden(value: Any) -> bool:
    try:
        return float(value) < 0
    except (TypeError, ValueError):
        return False
