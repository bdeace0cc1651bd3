"""The plain way to score a seq2seq model: one example at a time through `model.generate`, then ROUGE.

    python -m bench.baselines.plain_generate --model DIR --data eval.jsonl --prefix "summarize: "

Reads `document`/`summary` JSONL, generates greedily with the KV cache (the `generate` default), scores ROUGE-L
(rouge-score, stemmed) and prints one JSON line with examples/s. Uses no ftctl code.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--prefix", default="")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    started = time.time()

    import torch
    from rouge_score import rouge_scorer
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model).eval()
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    predictions = []
    generation_started = time.time()
    with torch.no_grad():
        for row in rows:
            inputs = tokenizer(args.prefix + row["document"], return_tensors="pt", truncation=True,
                               max_length=args.max_length)  # fmt: skip
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=1, do_sample=False)
            predictions.append(tokenizer.decode(output[0], skip_special_tokens=True).strip())
    seconds = time.time() - generation_started
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r["summary"], p)["rougeL"].fmeasure for r, p in zip(rows, predictions, strict=True)]
    print(
        json.dumps(
            {
                "examples_per_second": len(rows) / seconds,
                "runtime_s": seconds,
                "examples": len(rows),
                "rougeL": sum(rouge) / len(rouge),
                "wall_time_s": time.time() - started,
            }
        )
    )


if __name__ == "__main__":
    main()
