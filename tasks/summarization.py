"""Abstractive summarization: CNN/DailyMail, XSum, or any document/summary table.

Prompts (tasks/_prompts.py): T5-family models read `summarize: <document>`, BART the document; decoders are asked
to "Summarize the following article." (in one sentence for XSum), through their chat template when they have one,
else as `<instruction>\\n\\n<document>\\n\\nSummary:`, and learn the summary after it. Metrics: ROUGE-1/2/L/Lsum
F-measures from `rouge-score` with the Porter stemmer (see tasks/_metrics.py).

Data: CSV/TSV/JSON/JSONL/Parquet with a document column (`--text-column`) and a summary column
(`--label-column`), or a hub dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np

from ftctl import dataio
from tasks import _statistics as statistics
from tasks._generation import GenerationTask, require_columns
from tasks._metrics import rouge_scores
from tasks._prompts import PromptSpec
from tasks.base import Preset, register_task


@register_task
class SummarizationTask(GenerationTask):
    name = "summarization"
    description = "write a short summary of a document"
    metrics = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    primary_metric = "rougeL"
    pipeline_tag = "summarization"
    prompt_spec = PromptSpec(
        instruction="Summarize the following article.",
        chat="{instruction}\n\n{text}",
        plain="{instruction}\n\n{text}\n\nSummary:",
        seq2seq="summarize: {text}",
        seq2seq_plain="{text}",
        fields=("text",),
        body="text",
    )
    defaults = {"max_length": 512}
    max_new_tokens = 128
    max_target_length = 128
    presets = {
        "summarization": Preset(
            "generic: document and summary columns (--text-column, --label-column)",
            values={"text_column": ["document"], "label_column": "summary"},
        ),
        "cnn_dailymail": Preset(
            "CNN/DailyMail news articles with multi-sentence highlights",
            hub=("abisee/cnn_dailymail", "3.0.0"),
            values={"text_column": ["article"], "label_column": "highlights"},
            facts={"max_new_tokens": 128, "max_target_length": 128},
        ),
        "xsum": Preset(
            "XSum BBC articles with one-sentence summaries",
            hub=("EdinburghNLP/xsum", None),
            values={"text_column": ["document"], "label_column": "summary"},
            facts={
                "max_new_tokens": 64,
                "max_target_length": 64,
                "instruction": "Summarize the following article in one sentence.",
            },
        ),
    }

    def read_file(self, path: str, what: str) -> datasets.Dataset:
        if path.lower().endswith(".json"):  # also JSON objects written one after another
            return dataio.dataset_of(dataio.read_json_objects(path, what), path, what)
        return dataio.read_table(path, what)

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> Mapping[str, Any]:
        document, summary = self.cfg.text_column[0], self.cfg.label_column
        require_columns(splits, [document, summary], {document: "--text-column", summary: "--label-column"})
        return {}

    def fields(self, example: dict[str, Any]) -> dict[str, str]:
        return {"text": str(example[self.cfg.text_column[0]]).strip()}

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        return self.with_column(ds, self.cfg.label_column, self.PLACEHOLDER)

    def example_from_text(self, text: str, context: str | None = None) -> dict[str, Any]:
        return {self.cfg.text_column[0]: text, str(self.cfg.label_column): self.PLACEHOLDER}

    def target(self, example: dict[str, Any]) -> str:
        return str(example[self.cfg.label_column]).strip()

    def score_texts(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        return rouge_scores(predictions, [r[0] for r in references])

    # ---- statistics for reports (tasks/_statistics.py): ROUGE F-measures are averages over documents --------------
    @classmethod
    def example_statistics(cls, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray:
        per_row = [rouge_scores([r["prediction"]], [r["reference"]]) for r in rows]
        return statistics.mean_statistics({m: [s[m] for s in per_row] for m in cls.metrics})

    @classmethod
    def metrics_from_totals(cls, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return statistics.mean_metrics(totals, cls.metrics)
