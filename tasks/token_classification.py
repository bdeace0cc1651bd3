"""Token classification: named-entity recognition and any other per-word tagging (CoNLL-2003 style).

Data: CoNLL column files (`token POS chunk NER` per line, a blank line between sentences, `-DOCSTART-` skipped;
any file that is not JSON/JSONL/Parquet is read this way), JSON/JSONL/Parquet rows with a word list and a tag
list, or a hub dataset. Words are joined with spaces and tokenized once; each sub-word is mapped back to its word
through the tokenizer's character offsets, which works the same for WordPiece, byte-level BPE and SentencePiece
tokenizers (GPT-2 style tokenizers refuse pre-split words unless built with `add_prefix_space`). The tag trains on
the first sub-word of each word only (`-100` elsewhere) unless `--label-all-tokens`.

Metrics (seqeval, the conlleval-compatible default mode): entity-level micro precision, recall and F1, token
accuracy, and a per-entity report. Words cut off by `--max-length` count as predicted `O`, so truncation lowers
the score rather than hiding gold entities.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

from ftctl import dataio
from ftctl.errors import FtctlError
from ftctl.options import option
from ftctl.vocab import Family, TaskKind
from tasks import _statistics as statistics
from tasks.base import DetailView, ModelFit, Preset, RowView, Task, register_task

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

TABLE_SUFFIXES = (".json", ".jsonl", ".parquet")
CONLL2003_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


@dataclass
class TokenOptions:
    label_all_tokens: bool = option(
        False, "train the tag on every sub-word of a word, not only the first (B- becomes I- after the first)"
    )


def _tag_names(feature: Any) -> list[str] | None:
    """Tag names of a hub `Sequence(ClassLabel)` column."""
    inner = getattr(feature, "feature", None)
    return list(getattr(inner, "names", None) or []) or None


@register_task
class TokenClassificationTask(Task):
    name = "token-classification"
    kind = TaskKind.TOKENS
    description = "tag every word of a sentence (named entities, ...)"
    metrics = ("precision", "recall", "f1", "accuracy")
    primary_metric = "f1"
    peft_task_type = "TOKEN_CLS"
    auto_model = "AutoModelForTokenClassification"
    pipeline_tag = "token-classification"
    Options = TokenOptions
    defaults = {"max_length": 256}
    extra_columns = ("word_starts", "tags")
    presets = {
        "ner": Preset(
            "generic: CoNLL column files, or JSON/JSONL with word and tag lists (--text-column, --label-column)",
            values={"text_column": ["tokens"], "label_column": "ner_tags"},
        ),
        "conll2003": Preset(
            "CoNLL-2003 English named entities (PER, ORG, LOC, MISC)",
            hub=("eriktks/conll2003", None),
            values={"text_column": ["tokens"], "label_column": "ner_tags"},
            facts={"label_names": CONLL2003_TAGS},
        ),
    }

    # ---- data -------------------------------------------------------------------------------------------------
    @property
    def token_column(self) -> str:
        if not self.cfg.text_column:
            raise FtctlError("no word column given: pass --text-column NAME (the column holding the word lists)")
        return self.cfg.text_column[0]

    def read_file(self, path: str, what: str) -> datasets.Dataset:
        if Path(path).suffix.lower() in TABLE_SUFFIXES:
            return dataio.read_table(path, what)
        return read_conll(path, what, self.token_column, self.cfg.label_column)

    def _tags(self, ds: datasets.Dataset) -> list[list[str]]:
        column = self.cfg.label_column
        names = _tag_names(ds.features.get(column))
        return [[names[t] if names and isinstance(t, int) else str(t) for t in row] for row in ds[column]]

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> Mapping[str, Any]:
        words, tags = self.token_column, self.cfg.label_column
        for split, ds in splits.items():
            if len(ds) == 0:
                raise FtctlError(f"{split} data has no sentences")
            for column, flag in ((words, "--text-column"), (tags, "--label-column")):
                if column not in ds.column_names:
                    raise FtctlError(
                        f"{split} data has no column '{column}'; columns found: {', '.join(ds.column_names)} "
                        f"(choose with {flag})"
                    )
            for i, (tokens, labels) in enumerate(zip(ds[words], ds[tags], strict=True)):
                if not isinstance(tokens, list) or not isinstance(labels, list):
                    raise FtctlError(
                        f"{split} data: row {i + 1} must hold lists of words ('{words}') and tags ('{tags}'), got "
                        f"{type(tokens).__name__} and {type(labels).__name__}"
                    )
                if len(tokens) != len(labels):
                    raise FtctlError(
                        f"{split} data: sentence {i + 1} has {len(tokens)} words but {len(labels)} tags; each word "
                        "needs exactly one tag"
                    )
                if not tokens:
                    raise FtctlError(f"{split} data: sentence {i + 1} has no words")
        if training:
            seen = {t for ds in splits.values() for row in self._tags(ds) for t in row}
            hint = self.preset.facts.get("label_names")
            if hint and seen <= set(hint):
                names = list(hint)
            else:
                names = sorted(seen, key=lambda t: (t != "O", t[2:], t))
            if len(names) < 2:
                raise FtctlError(f"the data has a single tag ({names[0]!r}); token classification needs at least two")
            state: Mapping[str, Any] = {"label_names": names}
        else:
            state = self.state
        known = set(state["label_names"])
        for split, ds in splits.items():
            unseen = sorted({t for row in self._tags(ds) for t in row} - known)
            if unseen:
                raise FtctlError(
                    f"{split} data has tag(s) {', '.join(unseen[:5])} the model was not trained on; known tags: "
                    f"{', '.join(state['label_names'])}"
                )
        return state

    @property
    def label_names(self) -> list[str]:
        return self.state["label_names"]

    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
        ids = {name: i for i, name in enumerate(self.label_names)}
        inside = {i: ids.get("I-" + name[2:], i) for name, i in ids.items() if name.startswith("B-")}
        words_column, label_all = self.token_column, self.opts.label_all_tokens
        max_length = min(self.cfg.max_length, tokenizer.model_max_length or self.cfg.max_length)
        tag_lists = [[ids[t] for t in row] for row in self._tags(ds)]

        def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            texts, owners = [], []
            for words in batch[words_column]:
                text, owner = "", []
                for w, word in enumerate(words):
                    if text:
                        text += " "
                        owner.append(-1)
                    text += str(word)
                    owner.extend([w] * len(str(word)))
                texts.append(text)
                owners.append(owner)
            enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
            labels, starts = [], []
            for row, offsets in enumerate(enc["offset_mapping"]):
                tags, owner = tag_lists[indices[row]], owners[row]
                row_labels, row_starts, previous = [], [], -1
                for position, (s, e) in enumerate(offsets):
                    word = next((owner[c] for c in range(s, e) if owner[c] >= 0), -1)
                    if word < 0:
                        row_labels.append(-100)
                    elif word != previous:
                        row_labels.append(tags[word])
                        row_starts.append(position)
                        previous = word
                    else:
                        row_labels.append(inside.get(tags[word], tags[word]) if label_all else -100)
                labels.append(row_labels)
                starts.append(row_starts)
            enc.pop("offset_mapping")
            enc["labels"] = labels
            enc["word_starts"] = starts
            enc["tags"] = [tag_lists[i] for i in indices]
            enc["length"] = [len(x) for x in enc["input_ids"]]
            return enc

        return ds.map(encode_batch, batched=True, with_indices=True, remove_columns=ds.column_names, desc="tokenizing")

    def collator(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> Any:
        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    # ---- model ------------------------------------------------------------------------------------------------
    def check_model(self, model_config: PretrainedConfig, family: Family) -> ModelFit:
        fit = super().check_model(model_config, family)
        if model_config.model_type not in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES:
            raise FtctlError(
                f"model type '{model_config.model_type}' has no token-classification head in transformers; pick an "
                "encoder (BERT, RoBERTa, ...), a decoder (GPT-2, Llama, ...) or T5 (its encoder is used)"
            )
        return fit

    def load_args(self, model_config: PretrainedConfig) -> dict[str, Any]:
        names = self.label_names
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }

    def build_model(self, ref: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]) -> torch.nn.Module:
        names = self.label_names
        model = self.load_pretrained(
            AutoModelForTokenClassification,
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
        return logits.argmax(-1)

    def _word_tags(self, predictions: Any, encoded: datasets.Dataset) -> tuple[list[list[str]], list[list[str]]]:
        """(predicted, gold) word-level tags per sentence; words past the truncation count as predicted O."""
        names = self.label_names
        outside = "O" if "O" in names else names[0]
        predicted, gold = [], []
        for row, (starts, tags) in enumerate(zip(encoded["word_starts"], encoded["tags"], strict=True)):
            words = [names[int(predictions[row][p])] for p in starts]
            predicted.append(words + [outside] * (len(tags) - len(words)))
            gold.append([names[t] for t in tags])
        return predicted, gold

    def compute_metrics(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        # deferred: a heavy import (seconds), paid only by the runs that use it
        from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

        predicted, gold = self._word_tags(predictions, encoded)
        return {
            "precision": float(precision_score(gold, predicted, zero_division=0)),
            "recall": float(recall_score(gold, predicted, zero_division=0)),
            "f1": float(f1_score(gold, predicted, zero_division=0)),
            "accuracy": float(accuracy_score(gold, predicted)),
        }

    def metric_details(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        # deferred: a heavy import (seconds), paid only by the runs that use it
        from seqeval.metrics import classification_report

        predicted, gold = self._word_tags(predictions, encoded)
        report = classification_report(gold, predicted, output_dict=True, zero_division=0)
        per_entity = {
            name: {
                "precision": float(values["precision"]),
                "recall": float(values["recall"]),
                "f1": float(values["f1-score"]),
                "support": int(values["support"]),
            }
            for name, values in report.items()
            if not name.endswith(" avg")
        }
        return {"per_entity": per_entity}

    @classmethod
    def report_details(cls, details: Mapping[str, Any]) -> list[DetailView]:
        per_entity = details.get("per_entity")
        if not isinstance(per_entity, dict) or not per_entity:
            return []
        kinds = sorted(per_entity)
        f1 = [per_entity[k].get("f1") for k in kinds]
        return [DetailView("bars", "F1 per entity type", kinds, f1, "F1")]

    def example_predictions(self, predictions: Any, encoded: datasets.Dataset) -> list[list[str]]:
        return self._word_tags(predictions, encoded)[0]

    # ---- statistics for reports (tasks/_statistics.py) ---------------------------------------------------------
    @classmethod
    def example_statistics(cls, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray:
        return statistics.entity_statistics([r["tags"] for r in rows], [r["prediction"] for r in rows])

    @classmethod
    def metrics_from_totals(cls, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return statistics.entity_metrics(totals)

    gold_fields = ("tags", "correct")
    row_view = RowView("correct", ("tokens",), "tags")

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        column = self.cfg.label_column
        if not column or column in ds.column_names:
            return ds
        return ds.add_column(column, [["O"] * len(words) for words in ds[self.token_column]])

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        rows = []
        for i, (words, tags) in enumerate(zip(raw[self.token_column], self._tags(raw), strict=True)):
            predicted = predictions[i]
            rows.append(
                {"index": i, "tokens": words, "tags": tags, "prediction": predicted, "correct": predicted == tags}
            )
        return rows


def read_conll(path: str, what: str, token_column: str, tag_column: str) -> datasets.Dataset:
    """A CoNLL column file: one token per line (`token POS chunk NER`, whitespace separated; the token is the first
    column and the tag the last), a blank line between sentences, `-DOCSTART-` lines skipped."""

    p = dataio.check_file(path, what)
    sentences: list[dict[str, list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    widths: dict[int, int] = {}  # number of columns -> the first line that has it
    for number, line in enumerate(dataio.read_text(p, what).splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                sentences.append({token_column: tokens, tag_column: tags})
            tokens, tags = [], []
            continue
        if len(fields) < 2:
            raise FtctlError(
                f"{what} {path} does not look like a CoNLL file: line {number} has one column "
                f"('{line.strip()[:40]}'); CoNLL lines hold a token and its tag (`token POS chunk NER`)"
            )
        widths.setdefault(len(fields), number)
        tokens.append(fields[0])
        tags.append(fields[-1])
    if len(widths) > 1:  # CoNLL lines all have the same columns; a table's rows split on spaces do not
        lines = ", ".join(f"line {n}: {w} columns" for w, n in sorted(widths.items(), key=lambda x: x[1])[:2])
        raise FtctlError(
            f"{what} {path} does not look like a CoNLL file: its lines have different numbers of columns ({lines}); "
            "give a CoNLL column file (`token POS chunk NER`), or JSON/JSONL rows with word and tag lists"
        )
    if tokens:
        sentences.append({token_column: tokens, tag_column: tags})
    if not sentences:
        raise FtctlError(f"{what} has no sentences: {path}")
    return datasets.Dataset.from_list(sentences)
