"""Sequence classification of a text or a text pair (sentiment, emotion, topic, NLI-style pairs).

Labels may be integers or strings; class ids follow a preset's label names where they fit the data, otherwise the
sorted distinct labels of the training data. Metrics (scikit-learn, offline): accuracy, macro-F1, macro precision
and recall, a per-class report and the confusion matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from ftctl.errors import FtctlError
from ftctl.vocab import Family, TaskKind
from tasks import _labels as class_labels
from tasks import _statistics as statistics
from tasks.base import DetailView, ModelFit, Preset, RowView, Task, register_task


@register_task
class ClassificationTask(Task):
    name = "classification"
    kind = TaskKind.CLASSIFICATION
    description = "classify a text or a text pair into one of N classes"
    metrics = ("accuracy", "f1", "precision", "recall")
    primary_metric = "accuracy"
    peft_task_type = "SEQ_CLS"
    auto_model = "AutoModelForSequenceClassification"
    pipeline_tag = "text-classification"
    defaults = {"max_length": 256}
    presets = {
        "classification": Preset(
            "generic: your CSV/TSV/JSON/JSONL/Parquet files, --text-column(s) and --label-column",
            values={"text_column": ["text"], "label_column": "label"},
        ),
        "sst2": Preset(
            "SST-2 binary sentiment; with no data options, the bundled demo sentiment set (offline)",
            hub=("stanfordnlp/sst2", None),
            bundled="demo_sentiment",
            values={"text_column": ["sentence"], "label_column": "label"},
            facts={"label_names": ["negative", "positive"]},
        ),
        "imdb": Preset(
            "IMDB movie-review sentiment (25k/25k reviews)",
            hub=("stanfordnlp/imdb", None),
            values={"text_column": ["text"], "label_column": "label", "max_length": 512},
            facts={"label_names": ["neg", "pos"]},
        ),
        "emotion": Preset(
            "six-class emotion of English tweets (dair-ai/emotion)",
            hub=("dair-ai/emotion", None),
            values={"text_column": ["text"], "label_column": "label", "max_length": 128},
            facts={"label_names": ["sadness", "joy", "love", "anger", "fear", "surprise"]},
        ),
        "amazon_polarity": Preset(
            "Amazon review polarity (3.6M/400k reviews)",
            hub=("fancyzhx/amazon_polarity", None),
            values={"text_column": ["content"], "label_column": "label"},
            facts={"label_names": ["negative", "positive"]},
        ),
    }

    # ---- data -------------------------------------------------------------------------------------------------
    def clean(self, splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        return class_labels.drop_hidden_test(splits, self.cfg.label_column)

    def split_off(self, train: datasets.Dataset, fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
        class_labels.check_columns({"train": train}, self.cfg.text_column, self.cfg.label_column)
        return class_labels.stratified_split(train, str(self.cfg.label_column), fraction, self.cfg.seed)

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> Mapping[str, Any]:
        hint = self.preset.facts.get("label_names")
        return class_labels.check_label_data(
            self.state, splits, training, self.cfg.text_column, self.cfg.label_column, hint, self.preset_name
        )

    @property
    def label_names(self) -> list[str]:
        return self.state["label_names"]

    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
        ids = class_labels.class_ids(self.state)
        columns, label_column = self.cfg.text_column, self.cfg.label_column
        max_length = min(self.cfg.max_length, tokenizer.model_max_length or self.cfg.max_length)

        def encode_batch(batch: dict[str, list]) -> dict[str, list]:
            texts = [[str(t) for t in batch[c]] for c in columns]
            enc = tokenizer(*texts, truncation=True, max_length=max_length)
            enc["labels"] = [ids[class_labels.label_of(v, "data", label_column, 0)] for v in batch[label_column]]
            enc["length"] = [len(x) for x in enc["input_ids"]]
            return enc

        return ds.map(encode_batch, batched=True, remove_columns=ds.column_names, desc="tokenizing")

    # ---- model ------------------------------------------------------------------------------------------------
    def check_model(self, model_config: PretrainedConfig, family: Family) -> ModelFit:
        fit = super().check_model(model_config, family)
        if model_config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise FtctlError(
                f"model type '{model_config.model_type}' has no sequence-classification head in transformers; "
                "pick an encoder (BERT, RoBERTa, ...), a decoder (GPT-2, Llama, ...) or T5/BART"
            )
        return fit

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """The classifier, plus the backbone's pooler where the head reads it (BERT-style models): the pooler is
        pretrained for next-sentence prediction, or not at all in sentence-embedding checkpoints such as MiniLM, so
        it belongs to the classification head."""
        heads = super().head_modules(model)
        prefix = model.base_model_prefix
        pooler = getattr(getattr(model, prefix, None), "pooler", None)
        if pooler is not None and any(True for _ in pooler.parameters()):
            name = f"{prefix}.pooler"
            heads = [name] + [h for h in heads if not h.startswith(name + ".")]
        return heads

    def load_args(self, model_config: PretrainedConfig) -> dict[str, Any]:
        names = self.label_names
        args: dict[str, Any] = {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }
        return {**args, **self.pad_arg(model_config)}

    def build_model(self, ref: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]) -> torch.nn.Module:
        names = self.label_names
        model = self.load_pretrained(
            AutoModelForSequenceClassification,
            ref,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            **load_kwargs,
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def reduce_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.float().softmax(-1)

    def compute_metrics(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        # deferred: a heavy import (seconds), paid only by the runs that use it
        from sklearn.metrics import accuracy_score, precision_recall_fscore_support

        predicted = predictions.argmax(-1)
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predicted, labels=list(range(len(self.label_names))), average="macro", zero_division=0
        )
        # Cross-entropy over exactly the scored examples; the Trainer's own eval loss averages per-batch means,
        # which counts the padding rows of uneven last batches when several processes evaluate.
        true_probability = predictions[np.arange(len(labels)), labels]
        return {
            "loss": float(-np.log(np.clip(true_probability, 1e-12, None)).mean()),
            "accuracy": float(accuracy_score(labels, predicted)),
            "f1": float(f1),
            "precision": float(precision),
            "recall": float(recall),
        }

    def metric_details(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        # deferred: a heavy import (seconds), paid only by the runs that use it
        from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

        predicted = predictions.argmax(-1)
        ids = list(range(len(self.label_names)))
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, predicted, labels=ids, average=None, zero_division=0
        )
        per_class = {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(self.label_names)
        }
        matrix = confusion_matrix(labels, predicted, labels=ids).tolist()
        return {"per_class": per_class, "confusion_matrix": {"labels": self.label_names, "matrix": matrix}}

    @classmethod
    def report_details(cls, details: Mapping[str, Any]) -> list[DetailView]:
        cm = details.get("confusion_matrix")
        if not isinstance(cm, dict):
            return []
        return [DetailView("matrix", "confusion matrix", [str(x) for x in cm["labels"]], cm["matrix"], "examples")]

    # ---- statistics for reports (tasks/_statistics.py) ---------------------------------------------------------
    @classmethod
    def example_statistics(cls, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray:
        index = {str(n): i for i, n in enumerate(state["label_names"])}
        gold = [index[str(r["label"])] for r in rows]
        return statistics.class_statistics(gold, [index.get(str(r["prediction"]), -1) for r in rows], len(index))

    @classmethod
    def metrics_from_totals(cls, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return statistics.class_metrics(totals, len(state["label_names"]))

    gold_fields = ("label", "correct")
    row_view = RowView("correct", ("text",), "label")

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        return self.with_column(ds, self.cfg.label_column, self.state["label_values"][0])

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        ids = class_labels.class_ids(self.state)
        columns, label_column = self.cfg.text_column, self.cfg.label_column
        rows = []
        for i, example in enumerate(raw):
            probs = predictions[i]
            k = int(probs.argmax())
            gold = ids[class_labels.label_of(example[label_column], "data", label_column, i)]
            row: dict[str, Any] = {"index": i, "text": example[columns[0]]}
            if len(columns) > 1:
                row["text_pair"] = example[columns[1]]
            row.update(
                label=self.label_names[gold],
                prediction=self.label_names[k],
                correct=k == gold,
                probabilities={n: round(float(p), 6) for n, p in zip(self.label_names, probs, strict=True)},
            )
            rows.append(row)
        return rows
