"""Machine translation: WMT16 English-Romanian, or any language pair.

Encoder-decoders read `translate English to Romanian: <text>` (the prefix for T5-family models only); decoders read
`Translate English to Romanian:\\n<text>\\nRomanian:` and learn the translation after it. Metrics: sacreBLEU corpus
BLEU and chrF (0-100), and METEOR (0-1) when a WordNet database is installed (see tasks/_metrics.py); without
one, the evaluation details say why METEOR is missing.

Data: JSON/JSONL rows `{"translation": {"en": ..., "ro": ...}}`, tables with one column per language code,
parallel text files (`train.source` beside `train.target`, or `train.en` beside `train.ro`: give the source side),
or a hub dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ftctl import dataio
from ftctl.errors import FtctlError
from ftctl.options import option
from tasks import _statistics as statistics
from tasks._generation import GenerationOptions, GenerationTask
from tasks._metrics import METEOR_NOTE, translation_scores, wordnet
from tasks._prompts import PromptSpec
from tasks.base import Preset, register_task

LANGUAGES = {
    "en": "English",
    "ro": "Romanian",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "cs": "Czech",
    "ru": "Russian",
    "fi": "Finnish",
    "tr": "Turkish",
    "zh": "Chinese",
    "ja": "Japanese",
}


@dataclass
class TranslationOptions(GenerationOptions):
    source_lang: str | None = option(None, "source language code, e.g. en (default: per preset)")
    target_lang: str | None = option(None, "target language code, e.g. ro (default: per preset)")


@register_task
class TranslationTask(GenerationTask):
    name = "translation"
    description = "translate text from one language to another"
    metrics = ("bleu", "chrf", "meteor")
    primary_metric = "bleu"
    pipeline_tag = "translation"
    Options = TranslationOptions
    defaults = {"max_length": 256}
    max_new_tokens = 128
    max_target_length = 128
    presets = {
        "translation": Preset("generic: any language pair (--source-lang, --target-lang)"),
        "wmt16_en_ro": Preset(
            "WMT16 English to Romanian news translation",
            hub=("wmt/wmt16", "ro-en"),
            facts={"source_lang": "en", "target_lang": "ro"},
        ),
    }

    prompt_spec = PromptSpec(
        instruction="Translate {source_lang} to {target_lang}.",
        chat="{instruction}\n\n{text}",
        plain="{instruction}\n\n{source_lang}: {text}\n{target_lang}:",
        seq2seq="translate {source_lang} to {target_lang}: {text}",
        seq2seq_plain="{text}",
        fields=("text", "source_lang", "target_lang"),
        body="text",
    )

    def lang(self, side: str) -> str:
        code = getattr(self.opts, f"{side}_lang") or self.preset.facts.get(f"{side}_lang")
        if not code:
            raise FtctlError(f"task '{self.preset_name}' needs --{side}-lang CODE (e.g. en, ro, de)")
        return code

    def read_file(self, path: str, what: str) -> datasets.Dataset:
        p = Path(path)
        source, target = self.lang("source"), self.lang("target")
        for own, partner in ((".source", ".target"), (f".{source}", f".{target}")):
            if p.suffix == own:
                return read_parallel(path, what, str(p.with_suffix(partner)), source, target)
        if p.suffix.lower() in (".json", ".jsonl"):
            return dataio.dataset_of(dataio.read_json_objects(path, what), path, what)
        return dataio.read_table(path, what)

    def _pair(self, example: dict[str, Any]) -> tuple[str, str]:
        source, target = self.lang("source"), self.lang("target")
        row = example.get("translation") if isinstance(example.get("translation"), dict) else example
        return str(row.get(source) or ""), str(row.get(target) or "")

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> Mapping[str, Any]:
        source, target = self.lang("source"), self.lang("target")
        for split, ds in splits.items():
            if len(ds) == 0:
                raise FtctlError(f"{split} data has no examples")
            if "translation" in ds.column_names:
                found = set(ds[0]["translation"] or {})
            else:
                found = set(ds.column_names)
            missing = [c for c in (source, target) if c not in found]
            if missing:
                raise FtctlError(
                    f"{split} data has no '{missing[0]}' text; found: {', '.join(sorted(found))} (expected "
                    f'{{"translation": {{"{source}": ..., "{target}": ...}}}} rows or one column per language; '
                    "choose the languages with --source-lang/--target-lang)"
                )
            for i, example in enumerate(ds):
                if not all(self._pair(example)):
                    raise FtctlError(f"{split} data: row {i + 1} has an empty {source} or {target} text")
        return {}

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        target = self.lang("target")
        if "translation" in ds.column_names:
            return ds.map(lambda row: {"translation": {target: self.PLACEHOLDER, **(row["translation"] or {})}})
        return self.with_column(ds, target, self.PLACEHOLDER)

    def example_from_text(self, text: str, context: str | None = None) -> dict[str, Any]:
        return {"translation": {self.lang("source"): text, self.lang("target"): self.PLACEHOLDER}}

    def fields(self, example: dict[str, Any]) -> dict[str, str]:
        source, target = (LANGUAGES.get(c, c) for c in (self.lang("source"), self.lang("target")))
        return {"text": self._pair(example)[0].strip(), "source_lang": source, "target_lang": target}

    def target(self, example: dict[str, Any]) -> str:
        return self._pair(example)[1].strip()

    def score_texts(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        scores, _ = translation_scores(predictions, [r[0] for r in references])
        return scores

    def metric_details(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        return {} if wordnet() is not None else {"notes": [METEOR_NOTE]}

    # ---- statistics for reports (tasks/_statistics.py): corpus BLEU and chrF from sacreBLEU's sufficient
    # statistics (as its own paired bootstrap resamples them); METEOR is an average over sentences ------------------
    @classmethod
    def example_statistics(cls, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray:
        predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
        bleu, chrf = _sacrebleu_metrics()
        parts = [statistics.sacrebleu_statistics(m, predictions, references) for m in (bleu, chrf)]
        if wordnet() is not None:
            meteor = [translation_scores([p], [r])[0]["meteor"] for p, r in zip(predictions, references, strict=True)]
            parts.append(statistics.mean_statistics({"meteor": meteor}))
        return np.concatenate(parts, axis=1)

    @classmethod
    def metrics_from_totals(cls, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        bleu, chrf = _sacrebleu_metrics()
        widths = [_width(bleu), _width(chrf)]
        out = {
            "bleu": statistics.sacrebleu_scores(bleu, totals[..., : widths[0]]),
            "chrf": statistics.sacrebleu_scores(chrf, totals[..., widths[0] : sum(widths)]),
        }
        if totals.shape[-1] > sum(widths):  # METEOR was computed (WordNet present)
            out.update(statistics.mean_metrics(totals[..., sum(widths) :], ("meteor",)))
        return out


def _sacrebleu_metrics() -> tuple[Any, Any]:
    """sacreBLEU's BLEU and chrF with the settings `corpus_bleu` and `corpus_chrf` use."""
    from sacrebleu.metrics import BLEU, CHRF  # deferred: a heavy import, paid by translation reports only

    return BLEU(), CHRF()


def _width(metric: Any) -> int:
    """How many sufficient statistics the metric keeps per sentence."""
    return len(metric._extract_corpus_statistics(["a"], [["a"]])[0])


def read_parallel(path: str, what: str, partner: str, source_column: str, target_column: str) -> datasets.Dataset:
    """Two line-aligned text files (source and target side) as one table."""
    p, q = dataio.check_file(path, what), dataio.check_file(partner, f"{what} (target side)")
    sources = dataio.read_text(p, what).splitlines()
    targets = dataio.read_text(q, what).splitlines()
    if len(sources) != len(targets):
        raise FtctlError(
            f"parallel files {path} and {partner} have {len(sources)} and {len(targets)} lines; they must align"
        )
    return datasets.Dataset.from_dict({source_column: sources, target_column: targets})
