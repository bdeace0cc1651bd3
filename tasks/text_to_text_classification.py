"""Classification as text-to-text on encoder-decoders (the T5 recipe): the model writes the label word.

The presets mirror the classification task's, with a `_t2t` suffix (`sst2_t2t`, `imdb_t2t`, `emotion_t2t`,
`classification_t2t`): same data, columns and label names, read and checked by the same code. The input is
`<preset> sentence: <text>` (`sentence1: ... sentence2: ...` for pairs), the target the class's label name.
Generated text is mapped back to a class by its normalised label name (case and surrounding space ignored); a
prediction outside the label set counts as wrong, and the number of such predictions is reported as `invalid`.
Metrics: accuracy and macro-F1 over the classes, like the classification task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np

from ftctl.vocab import Family
from tasks import labels as class_labels
from tasks import statistics
from tasks.base import Preset, register_task
from tasks.classification import ClassificationTask
from tasks.generation import GenerationOptions, GenerationTask

SUFFIX = "_t2t"


@register_task
class TextToTextClassificationTask(GenerationTask):
    name = "text-to-text-classification"
    description = "classify by generating the label word (encoder-decoders, T5 style)"
    metrics = ("accuracy", "f1", "invalid")
    primary_metric = "accuracy"
    families = (Family.ENCODER_DECODER,)
    Options = GenerationOptions
    defaults = ClassificationTask.defaults
    max_target_length = 8
    presets = {
        name + SUFFIX: Preset(
            f"{preset.description}, answered with the label word (text-to-text)",
            hub=preset.hub,
            bundled=preset.bundled,
            values=preset.values,
            facts=preset.facts,
        )
        for name, preset in ClassificationTask.presets.items()
    }

    # data reading, splitting and label checks: the same as the classification task's (tasks/labels.py)
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

    def _words(self) -> list[str]:
        return [str(n) for n in self.state["label_names"]]

    def prompt_parts(self, example: dict[str, Any]) -> tuple[str, str, str]:
        columns = self.cfg.text_column
        prefix = self.preset_name.removesuffix(SUFFIX) + " "
        if len(columns) > 1:
            return f"{prefix}sentence1: {example[columns[0]]} sentence2: ", str(example[columns[1]]), ""
        return f"{prefix}sentence: ", str(example[columns[0]]), ""

    def _class(self, example: dict[str, Any]) -> int:
        ids = class_labels.class_ids(self.state)
        return ids[class_labels.label_of(example[self.cfg.label_column], "data", self.cfg.label_column, 0)]

    def target(self, example: dict[str, Any]) -> str:
        return self._words()[self._class(example)]

    def generation_kwargs(self) -> dict[str, Any]:
        tokenizer = self.prepared_tokenizer
        longest = max(len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in self._words())
        return {**super().generation_kwargs(), "max_new_tokens": self.opts.max_new_tokens or longest + 1}

    def classes(self, texts: list[str]) -> list[int]:
        """Class index of each generated text, -1 when it is not a label word."""
        lookup = {w.strip().lower(): i for i, w in enumerate(self._words())}
        return [lookup.get(t.strip().lower(), -1) for t in texts]

    def score_texts(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        # deferred: a heavy import (seconds), paid only by the runs that use it
        from sklearn.metrics import accuracy_score, f1_score

        predicted, gold = self.classes(predictions), self.classes([r[0] for r in references])
        ids = list(range(len(self._words())))
        return {
            "accuracy": float(accuracy_score(gold, predicted)),
            "f1": float(f1_score(gold, predicted, labels=ids, average="macro", zero_division=0)),
            "invalid": float(sum(p < 0 for p in predicted)),
        }

    def metric_details(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        texts = self.texts(predictions)
        invalid = sorted({t for t, c in zip(texts, self.classes(texts), strict=True) if c < 0})
        return {"invalid_predictions": {"count": sum(c < 0 for c in self.classes(texts)), "examples": invalid[:20]}}

    # ---- statistics for reports (tasks/statistics.py) ---------------------------------------------------------
    def example_statistics(self, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray:
        """Classes as `classes` finds them (the label word, case and spaces aside), plus whether it was one."""
        index = {str(n).strip().lower(): i for i, n in enumerate(state["label_names"])}
        gold = [index[str(r["label"]).strip().lower()] for r in rows]
        predicted = [index.get(str(r["prediction"]).strip().lower(), -1) for r in rows]
        invalid = np.asarray([[p < 0] for p in predicted], dtype=float).reshape(-1, 1)
        return np.concatenate([statistics.class_statistics(gold, predicted, len(index)), invalid], axis=1)

    def metrics_from_totals(self, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        scores = statistics.class_metrics(totals[..., :-1], len(state["label_names"]))
        return {"accuracy": scores["accuracy"], "f1": scores["f1"], "invalid": totals[..., -1]}

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        rows = []
        for i, (example, text) in enumerate(zip(raw, predictions, strict=True)):
            gold = self.target(example)
            rows.append(
                {
                    "index": i,
                    "text": example[self.cfg.text_column[0]],
                    "label": gold,
                    "prediction": text,
                    "correct": text.strip().lower() == gold.strip().lower(),
                    "valid": self.classes([text])[0] >= 0,
                }
            )
        return rows
