"""Classification as text-to-text on encoder-decoders (the T5 recipe): the model writes the label word.

The presets mirror the classification task's, with a `_t2t` suffix (`sst2_t2t`, `imdb_t2t`, `emotion_t2t`,
`classification_t2t`): same data, columns and label names, read and checked by the same code. The input is
`<preset> sentence: <text>` (`sentence1: ... sentence2: ...` for pairs), the target the class's label name.
Generated text is mapped back to a class by its normalised label name (case and surrounding space ignored); a
prediction outside the label set counts as wrong, and the number of such predictions is reported as `invalid`.
Metrics: accuracy and macro-F1 over the classes, like the classification task.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
import torch

from ftctl.errors import FtctlError
from ftctl.vocab import Family
from tasks import _labels as class_labels
from tasks import _statistics as statistics
from tasks._generation import GenerationOptions, GenerationTask, special_ids
from tasks._prompts import PromptSpec, Shot
from tasks.base import Preset, RowView, register_task
from tasks.classification import ClassificationTask

SUFFIX = "_t2t"
INSTRUCTIONS = {  # per preset (without the suffix); the generic task's is PromptSpec.instruction
    "sst2": "What is the sentiment of this sentence? Answer with one of: {labels}.",
    "imdb": "What is the sentiment of this movie review? Answer with one of: {labels}.",
    "emotion": "Which emotion does this text express? Answer with one of: {labels}.",
    "amazon_polarity": "What is the sentiment of this product review? Answer with one of: {labels}.",
}
SINGLE_SPEC = PromptSpec(
    instruction="Classify the text. Answer with one of: {labels}.",
    chat="{instruction}\n\nText: {text}",
    plain="{instruction}\n\nText: {text}\nAnswer:",
    seq2seq="{task} sentence: {text}",  # the T5 paper's GLUE format
    seq2seq_plain="{task} sentence: {text}",
    fields=("text", "text2", "labels", "task"),
    body="text",
)
PAIR_SPEC = PromptSpec(
    instruction="Classify the pair of sentences. Answer with one of: {labels}.",
    chat="{instruction}\n\nSentence 1: {text}\nSentence 2: {text2}",
    plain="{instruction}\n\nSentence 1: {text}\nSentence 2: {text2}\nAnswer:",
    seq2seq="{task} sentence1: {text} sentence2: {text2}",
    seq2seq_plain="{task} sentence1: {text} sentence2: {text2}",
    fields=("text", "text2", "labels", "task"),
    body="text2",
)


@register_task
class TextToTextClassificationTask(GenerationTask):
    name = "text-to-text-classification"
    description = "classify by generating the label word (encoder-decoders, T5 style)"
    metrics = ("accuracy", "f1", "generation_accuracy", "invalid")
    primary_metric = "accuracy"
    families = (Family.ENCODER_DECODER, Family.DECODER)
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

    # data reading, splitting and label checks: the same as the classification task's (tasks/_labels.py)
    def clean(self, splits: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
        return class_labels.drop_hidden_test(splits, self.cfg.label_column)

    def split_off(self, train: datasets.Dataset, fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
        class_labels.check_columns({"train": train}, self.cfg.text_column, self.cfg.label_column)
        return class_labels.stratified_split(train, str(self.cfg.label_column), fraction, self.cfg.seed)

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> Mapping[str, Any]:
        hint = self.preset.facts.get("label_names")
        if training and self.cfg.label_column in splits["train"].column_names:  # before the labels are learnt
            _check_words(class_labels.labels_of(splits["train"], str(self.cfg.label_column), "train data"))
        state = class_labels.check_label_data(
            self.state, splits, training, self.cfg.text_column, self.cfg.label_column, hint, self.preset_name
        )
        _check_words(state["label_names"])
        return state

    gold_fields = ("label", "correct", "generated_correct")
    row_view = RowView("correct", ("text", "prompt"), "label")

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        return self.with_column(ds, self.cfg.label_column, self.state["label_values"][0])

    def example_from_text(self, text: str, context: str | None = None) -> dict[str, Any]:
        columns = self.cfg.text_column
        example = {columns[0]: text, str(self.cfg.label_column): self.state["label_values"][0]}
        if len(columns) > 1:
            if not context:
                raise FtctlError(f"this run classifies pairs: pass the second text ({columns[1]}) with --context")
            example[columns[1]] = context
        return example

    def _words(self) -> list[str]:
        return [str(n) for n in self.state["label_names"]]

    def spec(self) -> PromptSpec:
        return PAIR_SPEC if len(self.cfg.text_column) > 1 else SINGLE_SPEC

    def instruction(self) -> str | None:
        return INSTRUCTIONS.get(self.preset_name.removesuffix(SUFFIX))

    def fields(self, example: dict[str, Any]) -> dict[str, str]:
        columns = self.cfg.text_column
        return {
            "text": str(example[columns[0]]).strip(),
            "text2": str(example[columns[1]]).strip() if len(columns) > 1 else "",
            "labels": ", ".join(self._words()),
            "task": self.preset_name.removesuffix(SUFFIX),
        }

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

    def few_shot(self, train: datasets.Dataset, k: int, seed: int) -> tuple[Shot, ...]:
        """K training examples with the classes balanced (round robin over the classes, each class's examples in a
        seeded order), then shuffled with the same seed: deterministic, and no class left out while K allows."""
        rng = random.Random(seed)
        by_class: dict[int, list[int]] = {}
        for i, example in enumerate(train):
            by_class.setdefault(self._class(example), []).append(i)
        queues = [rng.sample(members, len(members)) for _, members in sorted(by_class.items())]
        picked: list[int] = []
        while len(picked) < k:
            for queue in queues:
                if queue and len(picked) < k:
                    picked.append(queue.pop())
        rng.shuffle(picked)
        return tuple(self._shot(train[i]) for i in picked)

    # ---- constrained scoring: each label's answer scored by its likelihood after the prompt ---------------------
    def choices(self) -> list[list[int]]:
        """Each label word as the model would write it: its tokens and the token that ends the answer. Scoring the
        end too tells apart labels where one is the start of another; shared first tokens need nothing special,
        since every token of every label is scored."""
        tokenizer, fmt = self.prepared_tokenizer, self.prompt_format()
        if not self.decoder:
            before, after = special_ids(tokenizer)
            ends = after or [tokenizer.eos_token_id]
            return [before + tokenizer(w, add_special_tokens=False)["input_ids"] + ends for w in self._words()]
        spaced = ""
        if fmt.mode == "plain":  # as the training targets: after a space when the prompt does not end in one
            spaced = fmt.answer_space("".join(fmt.render(self.fields(dict.fromkeys(self.cfg.text_column, "x")))))
        end = self.stop_ids(fmt)[0]
        return [tokenizer(spaced + w, add_special_tokens=False)["input_ids"] + [end] for w in self._words()]

    def choice_scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(examples, labels): the summed log-probability of each label's answer after each example's prompt."""
        choices = self.choices()
        if self.decoder:
            return decoder_choice_scores(model, batch["input_ids"], batch["attention_mask"], choices)
        return encoder_decoder_choice_scores(model, batch["input_ids"], batch["attention_mask"], choices)

    def compute_metrics(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        # deferred: a heavy import (seconds), paid only by the runs that use it
        from sklearn.metrics import accuracy_score, f1_score

        generated, scores = predictions
        gold = self.classes([r[0] for r in encoded["references"]])
        ids = list(range(len(self._words())))
        constrained, free = np.asarray(scores).argmax(-1), self.classes(self.texts(generated))
        return {
            "accuracy": float(accuracy_score(gold, constrained)),
            "f1": float(f1_score(gold, constrained, labels=ids, average="macro", zero_division=0)),
            "generation_accuracy": float(accuracy_score(gold, free)),
            "invalid": float(sum(p < 0 for p in free)),
        }

    def score_texts(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        """Generated label words scored as free generation (the report's per-example view of generated text)."""
        predicted, gold = self.classes(predictions), self.classes([r[0] for r in references])
        return {
            "generation_accuracy": float(np.mean([p == g for p, g in zip(predicted, gold, strict=True)])),
            "invalid": float(sum(p < 0 for p in predicted)),
        }

    def example_predictions(self, predictions: Any, encoded: datasets.Dataset) -> list[dict[str, Any]]:
        generated, scores = predictions
        return [{"generated": t, "scores": s} for t, s in zip(self.texts(generated), np.asarray(scores), strict=True)]

    def metric_details(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        texts = self.texts(predictions[0])
        invalid = sorted({t for t, c in zip(texts, self.classes(texts), strict=True) if c < 0})
        return {
            "scoring": "accuracy and f1: the label with the most likely answer after the prompt (constrained); "
            "generation_accuracy and invalid: the generated text read as a label",
            "invalid_predictions": {"count": sum(c < 0 for c in self.classes(texts)), "examples": invalid[:20]},
        }

    # ---- statistics for reports (tasks/_statistics.py) ---------------------------------------------------------
    @classmethod
    def example_statistics(cls, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray:
        """The constrained prediction's class statistics, whether the generated text was right, and whether it was a
        label at all."""
        index = {str(n).strip().lower(): i for i, n in enumerate(state["label_names"])}
        gold = [index[str(r["label"]).strip().lower()] for r in rows]
        predicted = [index.get(str(r["prediction"]).strip().lower(), -1) for r in rows]
        generated = [index.get(str(r["generated"]).strip().lower(), -1) for r in rows]
        extra = np.asarray([[g == t, g < 0] for g, t in zip(generated, gold, strict=True)], dtype=float).reshape(-1, 2)
        return np.concatenate([statistics.class_statistics(gold, predicted, len(index)), extra], axis=1)

    @classmethod
    def metrics_from_totals(cls, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        scores = statistics.class_metrics(totals[..., :-2], len(state["label_names"]))
        n = totals[..., 0]
        return {
            "accuracy": scores["accuracy"],
            "f1": scores["f1"],
            "generation_accuracy": np.divide(totals[..., -2], n, out=np.zeros(np.shape(n)), where=n > 0),
            "invalid": totals[..., -1],
        }

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        words, fmt = self._words(), self.prompt_format()
        rows = []
        for i, (example, predicted) in enumerate(zip(raw, predictions, strict=True)):
            gold, text, scores = self.target(example), predicted["generated"], predicted["scores"]
            head, body, tail = self.prompt_parts(example, fmt)
            choice = words[int(np.argmax(scores))]
            rows.append(
                {
                    "index": i,
                    "text": example[self.cfg.text_column[0]],
                    "prompt": head + body + tail,
                    "label": gold,
                    "prediction": choice,
                    "correct": choice == gold,
                    "log_likelihoods": {w: round(float(v), 6) for w, v in zip(words, scores, strict=True)},
                    "generated": text,
                    "generated_correct": text.strip().lower() == gold.strip().lower(),
                    "valid": self.classes([text])[0] >= 0,
                }
            )
        return rows


def _left_aligned(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def decoder_choice_scores(
    model: torch.nn.Module, prompts: torch.Tensor, prompt_mask: torch.Tensor, choices: list[list[int]]
) -> torch.Tensor:
    """Summed log-probabilities of each choice after each (left-padded) prompt. Every (prompt, choice) row is
    left-padded so that all rows end together: only the last positions' logits are computed (`logits_to_keep`),
    never a vocabulary-sized row for every prompt token, and positions count from each row's first real token."""
    longest = max(len(c) for c in choices)
    rows = []
    for prompt, mask in zip(prompts.tolist(), prompt_mask.tolist(), strict=True):
        real = [t for t, m in zip(prompt, mask, strict=True) if m]
        rows += [real + choice for choice in choices]
    ids, mask = _left_aligned(rows, 0)
    ids, mask = ids.to(prompts.device), mask.to(prompts.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=longest + 1).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts the token at t + 1
    scores = torch.zeros(len(rows), device=prompts.device)
    for r in range(len(rows)):
        choice = choices[r % len(choices)]
        tokens = torch.tensor(choice, device=prompts.device)
        scores[r] = logp[r, longest - len(choice) :].gather(-1, tokens[:, None]).sum()
    return scores.view(-1, len(choices))


def encoder_decoder_choice_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, choices: list[list[int]]
) -> torch.Tensor:
    """Summed log-probabilities of each choice as the decoder's output for each encoder input."""
    count = len(choices)
    longest = max(len(c) for c in choices)
    labels = torch.tensor([c + [-100] * (longest - len(c)) for c in choices], device=input_ids.device)
    labels = labels.repeat(input_ids.shape[0], 1)
    logits = model(
        input_ids=input_ids.repeat_interleave(count, 0),
        attention_mask=attention_mask.repeat_interleave(count, 0),
        labels=labels,
    ).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    kept = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * kept).sum(-1).view(-1, count)


def _check_words(labels: Any) -> None:
    """Label words a model can write and a reader can tell apart: none empty, none equal to another once case and
    surrounding spaces are dropped (as generated answers are compared)."""
    words: dict[str, str] = {}
    for name in dict.fromkeys(str(n) for n in labels):
        word = name.strip().lower()
        if not word:
            raise FtctlError(
                f"label {name!r} is empty once spaces are dropped: a model cannot write it; name the classes with "
                "words (e.g. map the labels in the data)"
            )
        if word in words:
            raise FtctlError(
                f"labels {words[word]!r} and {name!r} are the same word once case and spaces are dropped, so a "
                "generated answer could not tell them apart; merge or rename them"
            )
        words[word] = name
