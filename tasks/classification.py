"""Sequence classification of a text or a text pair (sentiment, emotion, topic, NLI-style pairs).

Labels may be integers or strings; class ids follow a preset's label names where they fit the data, otherwise the
sorted distinct labels of the training data. Metrics (scikit-learn, offline): accuracy, macro-F1, macro precision
and recall, a per-class report and the confusion matrix.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from launch.errors import FtctlError
from tasks.base import Preset, Task, register_task

if TYPE_CHECKING:
    import datasets
    import torch

_INT = re.compile(r"[+-]?\d+")


def _label(value: Any, where: str, column: str, row: int) -> int | str:
    """One label as an int or a string; numbers that are not whole are refused (that is regression data)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        value = value.strip()
        if _INT.fullmatch(value):
            return int(value)
        try:
            value = float(value) if value else value
        except ValueError:
            return value
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        raise FtctlError(f"{where}: row {row + 1} has no label in column '{column}'")
    if isinstance(value, float):
        if not value.is_integer():
            raise FtctlError(
                f"{where}: label column '{column}' holds non-integer numbers (e.g. {value}); classification needs "
                "class labels (for a similarity or regression score use --task stsb)"
            )
        return int(value)
    if isinstance(value, int):
        return value
    raise FtctlError(
        f"{where}: label column '{column}' must hold single values, got {type(value).__name__} in row {row + 1}"
    )


def labels_of(ds: datasets.Dataset, column: str, where: str) -> list[int | str]:
    values = [_label(v, where, column, i) for i, v in enumerate(ds[column])]
    if any(isinstance(v, str) for v in values) and any(isinstance(v, int) for v in values):
        values = [str(v) for v in values]
    return values


@register_task
class ClassificationTask(Task):
    name = "classification"
    kind = "classification"
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
        test = splits.get("test")
        column = self.cfg.label_column
        if (
            test is not None
            and column in test.column_names
            and len(test)
            and all(isinstance(v, int) and v < 0 for v in test[column][:1000])
        ):
            del splits["test"]  # GLUE-style hidden test labels (-1): nothing to score against
        return splits

    def split_off(self, train: datasets.Dataset, fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
        """Stratified by label when every class has at least two examples, so small classes reach validation."""
        from collections import Counter

        from sklearn.model_selection import train_test_split

        self._check_columns({"train": train})
        labels = labels_of(train, self.cfg.label_column, "train data")
        if len(train) < 2:
            raise FtctlError(f"the train data has {len(train)} example(s); need at least 2 to hold out validation data")
        stratify = labels if min(Counter(labels).values()) >= 2 else None
        n_val = max(1, round(len(train) * fraction))
        if stratify is not None:
            n_val = max(n_val, len(set(labels)))
        try:
            train_idx, val_idx = train_test_split(
                list(range(len(train))), test_size=n_val, random_state=self.cfg.seed, stratify=stratify
            )
        except ValueError as exc:
            raise FtctlError(f"cannot hold out validation data from {len(train)} examples: {exc}") from None
        return train.select(sorted(train_idx)), train.select(sorted(val_idx))

    def _check_columns(self, splits: dict[str, datasets.Dataset]) -> None:
        if not self.cfg.text_column:
            raise FtctlError("no text column given: pass --text-column NAME (twice for sentence pairs)")
        if not self.cfg.label_column:
            raise FtctlError("no label column given: pass --label-column NAME")
        for split, ds in splits.items():
            for column in [*self.cfg.text_column, self.cfg.label_column]:
                if column not in ds.column_names:
                    flag = "--label-column" if column == self.cfg.label_column else "--text-column"
                    raise FtctlError(
                        f"{split} data has no column '{column}'; columns found: {', '.join(ds.column_names)} "
                        f"(choose with {flag})"
                    )

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> None:
        self._check_columns(splits)
        for split, ds in splits.items():
            if len(ds) == 0:
                raise FtctlError(f"{split} data has no examples")
            for column in self.cfg.text_column:
                for i, text in enumerate(ds[column]):
                    if text is None or (isinstance(text, float) and math.isnan(text)):
                        raise FtctlError(f"{split} data: row {i + 1} has no text in column '{column}'")
        if training:
            self._learn_labels(splits["train"])
        known = set(self.state["label_values"])
        for split, ds in splits.items():
            unseen = sorted({str(v) for v in labels_of(ds, self.cfg.label_column, f"{split} data") if v not in known})
            if unseen:
                raise FtctlError(
                    f"{split} data has label(s) {', '.join(unseen[:5])} that the model was not trained on; "
                    f"known labels: {', '.join(map(str, self.state['label_values']))}"
                )

    def _learn_labels(self, train: datasets.Dataset) -> None:
        column = self.cfg.label_column
        values = labels_of(train, column, "train data")
        distinct = set(values)
        if len(distinct) < 2:
            raise FtctlError(
                f"label column '{column}' of the train data has a single class ({next(iter(distinct))!r}); "
                "classification needs at least two"
            )
        feature = train.features.get(column)
        hint = self.preset.facts.get("label_names") or getattr(feature, "names", None)
        if hint and all(isinstance(v, int) for v in distinct):
            outside = sorted(v for v in distinct if not 0 <= v < len(hint))
            if outside:
                raise FtctlError(
                    f"train data has label(s) {', '.join(map(str, outside[:5]))} outside the {len(hint)} classes "
                    f"of task '{self.preset_name}' (0..{len(hint) - 1}: {', '.join(hint)}); fix the labels, or use "
                    "--task classification to take the classes from the data"
                )
            label_values, names = list(range(len(hint))), list(hint)
        elif hint and distinct <= set(hint):
            label_values, names = list(hint), list(hint)
        else:
            label_values = sorted(distinct)
            names = [str(v) for v in label_values]
        self.state = {"label_names": names, "label_values": label_values}

    @property
    def label_names(self) -> list[str]:
        return self.state["label_names"]

    def encode(self, ds: datasets.Dataset, tokenizer: Any) -> datasets.Dataset:
        ids = {v: i for i, v in enumerate(self.state["label_values"])}
        columns, label_column = self.cfg.text_column, self.cfg.label_column
        max_length = min(self.cfg.max_length, tokenizer.model_max_length or self.cfg.max_length)

        def encode_batch(batch: dict[str, list]) -> dict[str, list]:
            texts = [[str(t) for t in batch[c]] for c in columns]
            enc = tokenizer(*texts, truncation=True, max_length=max_length)
            enc["labels"] = [ids[_label(v, "data", label_column, 0)] for v in batch[label_column]]
            enc["length"] = [len(x) for x in enc["input_ids"]]
            return enc

        return ds.map(encode_batch, batched=True, remove_columns=ds.column_names, desc="tokenizing")

    # ---- model ------------------------------------------------------------------------------------------------
    def check_model(self, model_config: Any, family: str) -> None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

        super().check_model(model_config, family)
        if model_config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise FtctlError(
                f"model type '{model_config.model_type}' has no sequence-classification head in transformers; "
                "pick an encoder (BERT, RoBERTa, ...), a decoder (GPT-2, Llama, ...) or T5/BART"
            )

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

    def load_args(self, model_config: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"num_labels": len(self.label_names)}
        if getattr(model_config, "pad_token_id", None) is not None:
            args["pad_token_id"] = model_config.pad_token_id
        return args

    def build_model(self, ref: str, tokenizer: Any, load_kwargs: dict[str, Any]) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

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
        from sklearn.metrics import accuracy_score, precision_recall_fscore_support

        predicted = predictions.argmax(-1)
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predicted, labels=list(range(len(self.label_names))), average="macro", zero_division=0
        )
        import numpy as np

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

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        ids = {v: i for i, v in enumerate(self.state["label_values"])}
        columns, label_column = self.cfg.text_column, self.cfg.label_column
        rows = []
        for i, example in enumerate(raw):
            probs = predictions[i]
            k = int(probs.argmax())
            gold = ids[_label(example[label_column], "data", label_column, i)]
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
