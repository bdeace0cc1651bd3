"""Generative question answering on SQuAD-format data: the model writes the answer instead of pointing at it.

Encoder-decoders read `question: <q> context: <c>` (the T5 paper's format); decoders are asked to answer with a
short span of the context, through their chat template when they have one, else as
`<instruction>\\n\\nContext: <c>\\nQuestion: <q>\\nAnswer:`, and learn the answer after it (the context is what
gets shortened when the prompt is too long). The target is the first gold answer; generated answers are scored with
the official SQuAD normalisation against all gold answers: exact match and F1 (0-100).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np

from ftctl.errors import FtctlError
from tasks import _statistics as statistics
from tasks._generation import GenerationTask
from tasks._metrics import exact_match, squad_scores, token_f1
from tasks._prompts import PromptSpec
from tasks.base import Preset, register_task
from tasks.extractive_qa import COLUMNS, ExtractiveQaTask, answers_of


@register_task
class GenerativeQaTask(GenerationTask):
    name = "generative-qa"
    description = "answer a question about a context by writing the answer"
    metrics = ("exact_match", "f1")
    primary_metric = "f1"
    pipeline_tag = "text2text-generation"
    defaults = {"max_length": 512}
    max_new_tokens = 32
    max_target_length = 32
    presets = {
        "squad_gen": Preset(
            "SQuAD v1.1 answered by generation (same data formats as squad)", hub=("rajpurkar/squad", None)
        ),
    }
    read_file = ExtractiveQaTask.read_file
    prompt_spec = PromptSpec(
        instruction="Answer the question with a short span from the context.",
        chat="{instruction}\n\nContext: {context}\nQuestion: {question}",
        plain="{instruction}\n\nContext: {context}\nQuestion: {question}\nAnswer:",
        seq2seq="question: {question} context: {context}",
        seq2seq_plain="question: {question} context: {context}",
        fields=("question", "context"),
        body="context",
    )

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> Mapping[str, Any]:
        for split, ds in splits.items():
            missing = [c for c in COLUMNS if c not in ds.column_names]
            if missing or len(ds) == 0:
                raise FtctlError(
                    f"{split} data has no column(s) {', '.join(missing)}; columns found: {', '.join(ds.column_names)}"
                    if missing
                    else f"{split} data has no questions"
                )
            for i, row in enumerate(ds.select_columns(list(COLUMNS))):
                texts, _ = answers_of(row["answers"], str(row["context"]), f"{split} data, question {i + 1}", False)
                if not texts:
                    raise FtctlError(f"{split} data, question {i + 1} has no answer; generative QA needs one")
        return {}

    def _answers(self, example: dict[str, Any]) -> list[str]:
        return answers_of(example["answers"], str(example["context"]), "data", locate=False)[0]

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        return self.with_column(ds, "answers", {"text": [self.PLACEHOLDER], "answer_start": [-1]})

    def example_from_text(self, text: str, context: str | None = None) -> dict[str, Any]:
        if not context:
            raise FtctlError("generative QA answers from a context: pass --context TEXT beside the question --prompt")
        return {"question": text, "context": context, "answers": {"text": [self.PLACEHOLDER], "answer_start": [-1]}}

    def fields(self, example: dict[str, Any]) -> dict[str, str]:
        return {"question": str(example["question"]).strip(), "context": str(example["context"]).strip()}

    def target(self, example: dict[str, Any]) -> str:
        return self._answers(example)[0]

    def references(self, example: dict[str, Any]) -> list[str]:
        return self._answers(example)

    def score_texts(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        return {k: float(v) for k, v in squad_scores(predictions, references).items()}

    # ---- statistics for reports (tasks/_statistics.py): EM and F1 are averages over questions --------------------
    @classmethod
    def example_statistics(cls, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray:
        golds = [r.get("references") or [r["reference"]] for r in rows]
        values = {
            "exact_match": [
                max(exact_match(r["prediction"], g) for g in gs) for r, gs in zip(rows, golds, strict=True)
            ],
            "f1": [max(token_f1(r["prediction"], g) for g in gs) for r, gs in zip(rows, golds, strict=True)],
        }
        return statistics.mean_statistics(values)

    @classmethod
    def metrics_from_totals(cls, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return statistics.mean_metrics(totals, ("exact_match", "f1"), scale=100.0)
