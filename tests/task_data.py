"""Fixture data for the task tests, written by the tests themselves: small synthetic sets over the tiny
tokenizers' vocabulary, each learnable in a few dozen steps (the loss must fall), in each task's file formats."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tiny import FILLER, NEGATIVE, POSITIVE


def _words(rng: random.Random) -> tuple[list[str], list[str]]:
    """A sentence and its tags: positive words are POS entities, negative words NEG, two in a row one entity."""
    words, tags = [], []
    for _ in range(rng.randint(4, 8)):
        kind = rng.random()
        pool, entity = (POSITIVE, "POS") if kind < 0.2 else (NEGATIVE, "NEG") if kind < 0.4 else (FILLER, None)
        word = rng.choice(pool)
        if entity is None:
            tags.append("O")
        else:
            continues = bool(tags) and tags[-1].endswith(entity) and rng.random() < 0.5
            tags.append(("I-" if continues else "B-") + entity)
        words.append(word)
    return words, tags


def conll(path: Path, n: int, seed: int, docstart: bool = True) -> Path:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for _ in range(n):
        words, tags = _words(rng)
        lines += [f"{w} NN B-NP {t}" for w, t in zip(words, tags, strict=True)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ner_jsonl(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, tags = _words(rng)
        rows.append({"tokens": words, "ner_tags": tags})
    return write_jsonl(path, rows)


def similarity(path: Path, n: int, seed: int) -> Path:
    """Pairs scored 0-5 by how many positive words they share."""
    rng = random.Random(seed)
    lines = ["sentence1\tsentence2\tscore"]
    for _ in range(n):
        k = rng.randint(0, 5)
        a = rng.sample(FILLER, 3) + rng.sample(POSITIVE, k) + rng.sample(NEGATIVE, 5 - k)
        b = rng.sample(FILLER, 3) + rng.sample(POSITIVE, k)
        rng.shuffle(a)
        rng.shuffle(b)
        lines.append(f"{' '.join(a)}\t{' '.join(b)}\t{k + rng.random() * 0.2:.3f}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _qa_example(rng: random.Random, i: int, answerable: bool = True) -> dict:
    words = rng.sample(FILLER, rng.randint(6, 12))
    answer = rng.choice(POSITIVE)
    if answerable:
        words.insert(rng.randint(0, len(words)), answer)
    context = " ".join(words)
    answers = {"text": [answer] if answerable else [], "answer_start": [context.index(answer)] if answerable else []}
    return {"id": f"q{i}", "question": "what was good", "context": context, "answers": answers}


def squad_nested(path: Path, n: int, seed: int, unanswerable: float = 0.0) -> Path:
    """The official SQuAD JSON layout: data / paragraphs / qas."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        ex = _qa_example(rng, i, rng.random() >= unanswerable)
        qa = {
            "id": ex["id"],
            "question": ex["question"],
            "answers": [{"text": t, "answer_start": s} for t, s in zip(*ex["answers"].values(), strict=True)],
        }
        if unanswerable:
            qa["is_impossible"] = not ex["answers"]["text"]
        paragraphs.append({"context": ex["context"], "qas": [qa]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


def squad_flat(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    return write_jsonl(path, [_qa_example(rng, i) for i in range(n)])


def summaries(path: Path, n: int, seed: int) -> Path:
    """Documents whose 'summary' is their sentiment words, in order."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(FILLER, rng.randint(4, 8))
        key = rng.sample(POSITIVE + NEGATIVE, 2)
        for w in key:
            words.insert(rng.randint(0, len(words)), w)
        rows.append({"document": " ".join(words), "summary": " ".join(w for w in words if w in key)})
    return write_jsonl(path, rows)


def translations(path: Path, n: int, seed: int) -> Path:
    """`{"translation": {"en": ..., "ro": ...}}` where the 'Romanian' side swaps good and bad words."""
    rng = random.Random(seed)
    swap = dict(zip(POSITIVE + NEGATIVE, NEGATIVE + POSITIVE, strict=True))
    rows = []
    for _ in range(n):
        words = rng.sample(POSITIVE + NEGATIVE, 3)
        rows.append({"translation": {"en": " ".join(words), "ro": " ".join(swap[w] for w in words)}})
    return write_jsonl(path, rows)


def instructions(path: Path, n: int, seed: int) -> Path:
    """Alpaca JSON: the response names the positive word of the input."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(POSITIVE)
        words = rng.sample(FILLER, 4) + [word]
        rng.shuffle(words)
        rows.append({"instruction": "find the good word", "input": " ".join(words) if i % 4 else "", "output": word})
    path.write_text(json.dumps(rows, indent=1))
    return path


def prompt_completions(path: Path, n: int, seed: int) -> Path:
    """Prompt/completion JSONL: the completion repeats the prompt's positive word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(POSITIVE)
        words = rng.sample(FILLER, 3) + [word]
        rng.shuffle(words)
        rows.append({"prompt": " ".join(words) + " :", "completion": word})
    return write_jsonl(path, rows)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
