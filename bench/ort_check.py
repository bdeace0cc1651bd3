"""Does ONNX Runtime alone reproduce a run's recorded predictions? `python bench/ort_check.py EXPORT PREDICTIONS`

EXPORT is an `ftctl export --format onnx` directory, PREDICTIONS a run's predictions.jsonl (classification, NER or
STS-B rows). Imports onnxruntime and transformers only, never ftctl: what a user of the export would write. Prints
{"examples": N, "agree": K} as JSON. Used by tests/run/test_export.py and bench/export_parity.py.
"""

import json
import sys

import onnxruntime
from transformers import AutoConfig, AutoTokenizer

export, predictions = sys.argv[1], sys.argv[2]
assert "ftctl" not in sys.modules and "launch" not in sys.modules
config = AutoConfig.from_pretrained(export)
tokenizer = AutoTokenizer.from_pretrained(export)
session = onnxruntime.InferenceSession(export + "/model.onnx", providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
rows = [json.loads(line) for line in open(predictions)]
agree = 0
for row in rows:
    if "tokens" in row:
        enc = tokenizer(row["tokens"], is_split_into_words=True, return_tensors="np")
        logits = session.run(None, {n: enc[n] for n in names})[0][0]
        words, seen, tags = enc.word_ids(0), set(), []
        for position, word in enumerate(words):
            if word is not None and word not in seen:
                seen.add(word)
                tags.append(config.id2label[int(logits[position].argmax())])
        agree += tags == row["prediction"]
    elif isinstance(row["prediction"], float):  # STS-B: a score
        enc = tokenizer(row["text"], row["text_pair"], return_tensors="np")
        score = float(session.run(None, {n: enc[n] for n in names})[0][0][0])
        agree += abs(score - row["prediction"]) < 1e-3
    else:
        enc = tokenizer(row["text"], return_tensors="np")
        logits = session.run(None, {n: enc[n] for n in names})[0][0]
        agree += config.id2label[int(logits.argmax())] == row["prediction"]
print(json.dumps({"examples": len(rows), "agree": agree}))
