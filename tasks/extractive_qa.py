"""Extractive question answering (SQuAD v1.1 and v2.0): predict the answer's start and end token in the context.

Preprocessing: question and context are tokenized as a pair; a context longer than `--max-length` (default 384)
is cut into windows that overlap by `--doc-stride` tokens (default 128), so every answer lies whole inside some
window. Each window is labelled with the answer's token span where the answer lies inside it, else with the
null position (the [CLS] token, or the first token for models without one), as the BERT reference code does; the
windows holding the answer teach the span, the others teach "not here". Character offsets map tokens back to the
context.

Post-processing (per question, over all of its windows): the `--n-best-size` best start and end logits of each
window form candidate spans inside the context, no longer than `--max-answer-length` tokens; the best-scoring span
(start + end logit) is the answer. For SQuAD v2 the question is unanswerable when the null score (the smallest
over its windows) beats the best span by more than `--null-score-threshold`. Metrics: official EM and F1 (0-100),
and for v2 the HasAns/NoAns breakdown.

Data: the official nested JSON, flat JSON/JSONL rows (`id`, `question`, `context`, `answers` as
`{"text": [...], "answer_start": [...]}`, a list of `{"text", "answer_start"}` or a plain answer string), or hub ids.
Evaluation rows are windows, not questions: each carries its question's index, offsets, context and gold answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

from ftctl import dataio
from ftctl.errors import FtctlError, warn
from ftctl.options import option
from ftctl.vocab import Family, TaskKind
from tasks import _statistics as statistics
from tasks._metrics import exact_match, squad_scores, token_f1
from tasks.base import ModelFit, Preset, RowView, Task, fresh_modules, register_task

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

COLUMNS = ("question", "context", "answers")
MAX_QUESTION_TOKENS = 64


@dataclass
class QaOptions:
    doc_stride: int = option(128, "overlap in tokens between the windows of a long context")
    max_answer_length: int = option(30, "longest answer span considered, in tokens")
    n_best_size: int = option(20, "best start and end positions per window considered when decoding the answer")
    null_score_threshold: float = option(
        0.0, "SQuAD v2: answer 'no answer' when the null score beats the best span by more than this"
    )

    def validate(self) -> None:
        for name in ("doc_stride", "max_answer_length", "n_best_size"):
            if getattr(self, name) < 1:
                raise FtctlError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def answers_of(value: Any, context: str, where: str, locate: bool) -> tuple[list[str], list[int]]:
    """(texts, character starts) of one question's answers, from any of the accepted layouts. With `locate`, each
    answer must be found in the context: at its given start, else its first occurrence."""
    if value is None:
        texts, starts = [], []
    elif isinstance(value, str):
        texts, starts = ([value] if value else []), [-1] * bool(value)
    elif isinstance(value, dict):
        texts = list(value.get("text") or [])
        starts = list(value.get("answer_start") or [-1] * len(texts))
    elif isinstance(value, list):
        texts = [a["text"] if isinstance(a, dict) else str(a) for a in value]
        starts = [a.get("answer_start", -1) if isinstance(a, dict) else -1 for a in value]
    else:
        raise FtctlError(f"{where}: answers must be a string, a list or {{'text': [...], 'answer_start': [...]}}")
    texts = [str(t) for t in texts]
    starts = [int(s) if s is not None else -1 for s in starts] + [-1] * (len(texts) - len(starts))
    if locate:
        for k, (text, start) in enumerate(zip(texts, starts, strict=True)):
            if start < 0 or context[start : start + len(text)] != text:
                found = context.find(text)
                if found < 0:
                    raise FtctlError(f"{where}: the answer {text!r} is not found in its context")
                starts[k] = found
    return texts, starts[: len(texts)]


@register_task
class ExtractiveQaTask(Task):
    name = "extractive-qa"
    kind = TaskKind.QA
    description = "answer a question with a span of the given context"
    metrics = ("exact_match", "f1")
    primary_metric = "f1"
    families = (Family.ENCODER, Family.DECODER)
    peft_task_type = "QUESTION_ANS"
    auto_model = "AutoModelForQuestionAnswering"
    pipeline_tag = "question-answering"
    Options = QaOptions
    defaults = {"max_length": 384}
    extra_columns = ("example", "offsets", "null_index", "context", "golds")
    presets = {
        "squad": Preset(
            "SQuAD v1.1: every question is answerable (official JSON, flat JSON/JSONL or hub)",
            hub=("rajpurkar/squad", None),
        ),
        "squad_v2": Preset(
            "SQuAD v2.0: some questions have no answer in the context",
            hub=("rajpurkar/squad_v2", None),
            facts={"unanswerable": True},
        ),
    }

    @property
    def unanswerable(self) -> bool:
        return bool(self.preset.facts.get("unanswerable"))

    # ---- data -------------------------------------------------------------------------------------------------
    def read_file(self, path: str, what: str) -> datasets.Dataset:
        if not path.lower().endswith((".json", ".jsonl")):
            return dataio.read_table(path, what)
        rows = read_squad(path, what)
        for row in rows:  # one layout for every source, so the Arrow table has one schema
            if "answers" in row:
                texts, starts = answers_of(row["answers"], str(row.get("context", "")), what, locate=False)
                row["answers"] = {"text": texts, "answer_start": starts}
        return datasets.Dataset.from_list(rows)

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> Mapping[str, Any]:
        for split, ds in splits.items():
            if len(ds) == 0:
                raise FtctlError(f"{split} data has no questions")
            missing = [c for c in COLUMNS if c not in ds.column_names]
            if missing:
                raise FtctlError(
                    f"{split} data has no column(s) {', '.join(missing)}; columns found: {', '.join(ds.column_names)} "
                    "(question answering needs question, context and answers)"
                )
            moved = 0
            for i, row in enumerate(ds.select_columns(list(COLUMNS))):
                where = f"{split} data, question {i + 1}"
                if not str(row["question"] or "").strip() or not str(row["context"] or "").strip():
                    raise FtctlError(f"{where}: empty question or context")
                given = answers_of(row["answers"], row["context"], where, locate=False)[1]
                texts, starts = answers_of(row["answers"], row["context"], where, locate=True)
                moved += sum(g >= 0 and g != s for g, s in zip(given, starts, strict=True))
                if not texts and not self.unanswerable:
                    raise FtctlError(
                        f"{where} has no answer; SQuAD v1.1 questions all have one (for unanswerable questions "
                        "use --task squad_v2)"
                    )
            if moved:
                warn(
                    f"{split} data: {moved} answer(s) have an answer_start that does not point at their text, which "
                    "occurs elsewhere in the context; they were re-located to its first occurrence"
                )
        return {"unanswerable": self.unanswerable}

    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
        max_length = min(self.cfg.max_length, tokenizer.model_max_length or self.cfg.max_length)
        stride = self.opts.doc_stride
        cls_id = tokenizer.cls_token_id
        specials = len(tokenizer("a", "b")["input_ids"]) - 2

        def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            questions = [_short_question(str(q).strip(), tokenizer) for q in batch["question"]]
            contexts = [str(c) for c in batch["context"]]
            longest = max(len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions)
            room = max_length - longest - specials  # context tokens per window beside the longest question
            if stride >= room:
                raise FtctlError(
                    f"--doc-stride {stride} leaves no new context per window at --max-length {max_length} (questions "
                    f"take up to {longest} tokens); use a stride below {max(room, 1)}, e.g. a quarter of --max-length"
                )
            enc = tokenizer(
                questions,
                contexts,
                truncation="only_second",
                max_length=max_length,
                stride=stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
            out: dict[str, list] = {k: [] for k in ("start_positions", "end_positions", *self.extra_columns)}
            for f, sample in enumerate(enc.pop("overflow_to_sample_mapping")):
                sequence = enc.sequence_ids(f)
                offsets = [list(o) if sequence[t] == 1 else [-1, -1] for t, o in enumerate(enc["offset_mapping"][f])]
                ids = enc["input_ids"][f]
                null = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
                texts, starts = answers_of(batch["answers"][sample], contexts[sample], "data", locate=True)
                start = end = null
                if texts:
                    first, last = starts[0], starts[0] + len(texts[0])
                    inside = [t for t, (s, e) in enumerate(offsets) if s >= 0 and e > s]
                    if inside and offsets[inside[0]][0] <= first and last <= offsets[inside[-1]][1]:
                        start = max(t for t in inside if offsets[t][0] <= first)
                        end = min(t for t in inside if offsets[t][1] >= last)
                out["start_positions"].append(start)
                out["end_positions"].append(end)
                out["example"].append(indices[sample])
                out["offsets"].append(offsets)
                out["null_index"].append(null)
                out["context"].append(contexts[sample])
                out["golds"].append(texts)
            enc.pop("offset_mapping")
            out.update(enc)
            out["length"] = [len(x) for x in enc["input_ids"]]
            return out

        return ds.map(encode_batch, batched=True, with_indices=True, remove_columns=ds.column_names, desc="tokenizing")

    # ---- model ------------------------------------------------------------------------------------------------
    def check_model(self, model_config: PretrainedConfig, family: Family) -> ModelFit:
        fit = super().check_model(model_config, family)
        if model_config.model_type not in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES:
            raise FtctlError(
                f"model type '{model_config.model_type}' has no question-answering head in transformers; pick an "
                "encoder (BERT, RoBERTa, ...) or a decoder with one (GPT-2, Llama, Qwen2, ...)"
            )
        return fit

    def build_model(self, ref: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]) -> torch.nn.Module:
        model = self.load_pretrained(AutoModelForQuestionAnswering, ref, **load_kwargs)
        prefix = model.base_model_prefix
        if any(m == prefix or m.startswith(prefix + ".") for m in fresh_modules(model)):
            # Some QA classes (Llama's) call their backbone `transformer` where causal-LM checkpoints say `model`:
            # the backbone would silently start from random weights. Load it under the name the class uses.
            model = self.load_pretrained(
                AutoModelForQuestionAnswering, ref, key_mapping={r"^model\.": f"{prefix}."}, **load_kwargs
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def reduce_logits(self, logits: Any, labels: Any) -> torch.Tensor:
        start, end = logits[0], logits[1]
        return torch.stack([start.float(), end.float()], dim=-1)

    def decode(self, predictions: Any, encoded: datasets.Dataset) -> dict[int, dict[str, Any]]:
        """The answer to each question (by example index) from the start/end logits of its windows."""
        opts = self.opts
        best: dict[int, dict[str, Any]] = {}
        columns = encoded.select_columns(["example", "offsets", "null_index", "context", "golds"])
        for row, feature in enumerate(columns):
            example, offsets = feature["example"], feature["offsets"]
            start_logits = np.asarray(predictions[row, : len(offsets), 0], dtype=float)
            end_logits = np.asarray(predictions[row, : len(offsets), 1], dtype=float)
            null = feature["null_index"]
            entry = best.setdefault(
                example, {"text": "", "score": -math.inf, "null_score": math.inf, "golds": feature["golds"]}
            )
            entry["null_score"] = min(entry["null_score"], float(start_logits[null] + end_logits[null]))
            starts = np.argsort(start_logits)[::-1][: opts.n_best_size]
            ends = np.argsort(end_logits)[::-1][: opts.n_best_size]
            for s in starts:
                if offsets[s][0] < 0:
                    continue
                for e in ends:
                    if offsets[e][0] < 0 or e < s or e - s + 1 > opts.max_answer_length:
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if score > entry["score"]:
                        entry.update(score=score, text=feature["context"][offsets[s][0] : offsets[e][1]])
        for entry in best.values():
            no_answer = entry["score"] == -math.inf or (
                self.unanswerable and entry["null_score"] - entry["score"] > opts.null_score_threshold
            )
            entry["prediction"] = "" if no_answer else entry["text"]
        return best

    def compute_metrics(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        answers = self.decode(predictions, encoded)
        predicted, golds = [a["prediction"] for a in answers.values()], [a["golds"] for a in answers.values()]
        scores = squad_scores(predicted, golds, breakdown=self.unanswerable)
        return {k: float(v) for k, v in scores.items()}

    def example_predictions(self, predictions: Any, encoded: datasets.Dataset) -> list[dict[str, Any]]:
        answers = self.decode(predictions, encoded)
        return [answers[i] for i in sorted(answers)]

    # ---- statistics for reports (tasks/_statistics.py): EM and F1 are averages over questions --------------------
    @classmethod
    def example_statistics(cls, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray:
        return statistics.mean_statistics({m: [float(r[m]) for r in rows] for m in ("exact_match", "f1")})

    @classmethod
    def metrics_from_totals(cls, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return statistics.mean_metrics(totals, ("exact_match", "f1"), scale=100.0)

    gold_fields = ("answers", "exact_match", "f1")
    row_view = RowView("exact_match", ("question",), "answers")

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        return self.with_column(ds, "answers", {"text": [], "answer_start": []})

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        rows = []
        for i, (example, answer) in enumerate(zip(raw, predictions, strict=True)):
            golds = answer["golds"] or [""]
            predicted = answer["prediction"]
            rows.append(
                {
                    "index": i,
                    "id": example.get("id", i),
                    "question": example["question"],
                    "context": example["context"],
                    "answers": answer["golds"],
                    "prediction": predicted,
                    "exact_match": max(exact_match(predicted, g) for g in golds),
                    "f1": max(token_f1(predicted, g) for g in golds),
                    "score": None if answer["score"] == -math.inf else round(answer["score"], 4),
                    "null_score": round(answer["null_score"], 4),
                }
            )
        return rows


def _short_question(question: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The question cut to MAX_QUESTION_TOKENS tokens (at a token boundary), so a window always has room for
    context."""
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= MAX_QUESTION_TOKENS:
        return question
    return question[: enc["offset_mapping"][MAX_QUESTION_TOKENS - 1][1]]


def read_squad(path: str, what: str) -> list[dict[str, Any]]:
    """Question-answering rows (`id`, `question`, `context`, `answers`, ...) from the official SQuAD JSON (nested
    `data` / `paragraphs` / `qas`) or from flat JSON/JSONL rows, which are returned as they are."""
    rows = dataio.read_json_objects(path, what)
    if not any("paragraphs" in r for r in rows):
        return rows
    flat: list[dict[str, Any]] = []
    for article in rows:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context", "")
            for qa in paragraph.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                flat.append(
                    {
                        "id": str(qa.get("id", len(flat))),
                        "title": article.get("title", ""),
                        "context": context,
                        "question": qa.get("question", ""),
                        "answers": {
                            "text": [a["text"] for a in answers],
                            "answer_start": [a.get("answer_start", -1) for a in answers],
                        },
                    }
                )
    if not flat:
        raise FtctlError(f"{what} {path} has no questions (SQuAD layout: data / paragraphs / qas)")
    return flat
