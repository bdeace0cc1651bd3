"""Load ftctl run directories with plain Hugging Face code, as a user would, and print what they predict.

Run as a script by tests/run/test_interop.py, in a fresh process that never imports ftctl: it proves that a run
directory is usable without ftctl installed. Input: a JSON file of cases `{"name", "run", "kind", "adapter"}`;
output (stdout, last line): a JSON object of predictions per case, plus the ftctl modules that got imported (none).

Adapter runs of tasks with a new head (classification, NER, STS-B) are loaded with the head settings the run records
(`run.json` -> task.load_args, also in the model card's snippet): peft builds the base model from the base's own
config, which knows nothing of this task's labels. Full runs load with no arguments at all.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    pipeline,
)

ROWS = 4  # the first recorded predictions of each run are reproduced


def head_args(run: str) -> dict:
    args = dict(json.load(open(f"{run}/run.json"))["task"]["load_args"])
    if "id2label" in args:  # JSON keeps the ids as strings; transformers wants ints
        args["id2label"] = {int(k): v for k, v in args["id2label"].items()}
    return args


def recorded(run: str) -> list[dict]:
    with open(f"{run}/predictions.jsonl") as f:
        return [json.loads(line) for line in f][:ROWS]


def load(case: dict, auto_cls: type, peft_name: str):
    """AutoPeftModelFor* for adapters (with the recorded head settings), AutoModelFor* for full runs."""
    run = case["run"]
    if case["adapter"]:
        import peft

        return getattr(peft, peft_name).from_pretrained(run, **head_args(run)).eval()
    return auto_cls.from_pretrained(run).eval()


def pipe(case: dict, task: str, **kwargs):
    extra = {"model_kwargs": head_args(case["run"])} if case["adapter"] else {}
    return pipeline(task, model=case["run"], **extra, **kwargs)


def classification(case: dict) -> dict:
    rows = recorded(case["run"])
    texts = [r["text"] for r in rows]
    model = load(case, AutoModelForSequenceClassification, "AutoPeftModelForSequenceClassification")
    tokenizer = AutoTokenizer.from_pretrained(case["run"])
    with torch.no_grad():
        ids = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    return {
        "auto": [model.config.id2label[i] for i in ids],
        "pipeline": [r["label"] for r in pipe(case, "text-classification")(texts)],
    }


def regression(case: dict) -> dict:
    rows = recorded(case["run"])
    model = load(case, AutoModelForSequenceClassification, "AutoPeftModelForSequenceClassification")
    tokenizer = AutoTokenizer.from_pretrained(case["run"])
    enc = tokenizer([r["text"] for r in rows], [r["text_pair"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**enc).logits[:, 0].tolist()
    classify = pipe(case, "text-classification", function_to_apply="none")
    return {
        "auto": scores,
        "pipeline": [classify({"text": r["text"], "text_pair": r["text_pair"]})["score"] for r in rows],
    }


def tokens(case: dict) -> dict:
    """A tag per word, read at the word's first sub-token (as ftctl scores NER)."""
    rows = recorded(case["run"])
    model = load(case, AutoModelForTokenClassification, "AutoPeftModelForTokenClassification")
    tokenizer = AutoTokenizer.from_pretrained(case["run"])
    tags = []
    for r in rows:
        enc = tokenizer(r["tokens"], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            ids = model(**enc).logits[0].argmax(-1).tolist()
        firsts, seen = [], set()
        for position, word in enumerate(enc.word_ids()):
            if word is not None and word not in seen:
                seen.add(word)
                firsts.append(model.config.id2label[ids[position]])
        tags.append(firsts)
    entities = pipe(case, "token-classification")([" ".join(r["tokens"]) for r in rows])
    return {"auto": tags, "pipeline": sorted({e["entity"] for found in entities for e in found})}


def qa(case: dict) -> dict:
    """The best span (start + end logit, at most 30 tokens, inside the context). transformers 5 has no
    question-answering pipeline any more; the Auto class is what users call."""
    rows = recorded(case["run"])
    model = load(case, AutoModelForQuestionAnswering, "AutoPeftModelForQuestionAnswering")
    tokenizer = AutoTokenizer.from_pretrained(case["run"])
    found = []
    for r in rows:
        enc = tokenizer(r["question"], r["context"], return_offsets_mapping=True, return_tensors="pt")
        offsets, sequence = enc.pop("offset_mapping")[0].tolist(), enc.sequence_ids(0)
        with torch.no_grad():
            out = model(**enc)
        start, end = out.start_logits[0].tolist(), out.end_logits[0].tolist()
        context = [i for i, s in enumerate(sequence) if s == 1]
        best = max(
            ((start[s] + end[e], s, e) for s in context for e in context if s <= e < s + 30),
            key=lambda t: t[0],
        )
        found.append({"text": r["context"][offsets[best[1]][0] : offsets[best[2]][1]], "score": best[0]})
    return {"auto": found}


def seq2seq(case: dict) -> dict:
    """Greedy generation from the prompt the run recorded, exactly as the model read it (T5's task prefix included;
    transformers 5 has no summarization or translation pipeline any more)."""
    rows = recorded(case["run"])
    model = load(case, AutoModelForSeq2SeqLM, "AutoPeftModelForSeq2SeqLM")
    tokenizer = AutoTokenizer.from_pretrained(case["run"])
    texts = []
    for r in rows:
        enc = tokenizer(r["prompt"], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return {"auto": texts}


def causal(case: dict) -> dict:
    rows = recorded(case["run"])
    model = load(case, AutoModelForCausalLM, "AutoPeftModelForCausalLM")
    tokenizer = AutoTokenizer.from_pretrained(case["run"])
    texts = []
    for r in rows:
        enc = tokenizer(r["prompt"], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    generate = pipeline("text-generation", model=case["run"])
    piped = [  # ftctl reports an answer without the space that separates it from a plain prompt
        generate(r["prompt"], max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"].strip()
        for r in rows
    ]
    return {"auto": texts, "pipeline": piped}


KINDS = {f.__name__: f for f in (classification, regression, tokens, qa, seq2seq, causal)}

if __name__ == "__main__":
    cases = json.load(open(sys.argv[1]))
    results = {case["name"]: KINDS[case["kind"]](case) for case in cases}
    results["ftctl_modules"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("ftctl", "launch", "tasks", "methods")
    )
    print(json.dumps(results))
