"""The hand-written way: transformers Trainer + peft LoRA (query/value, r=8, alpha 16) on SST-2 sentences.

--pad-to 256 pads every example to a fixed length (the typical script); without it, dynamic padding, and
--group-by-length adds length-grouped batching (the best plain-library way). Prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import time

import numpy as np


def read_tsv(path: str, text_column: str, limit: int | None) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [r[text_column] for r in rows], [int(r["label"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--dev", required=True)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--pad-to", type=int, default=None)
    parser.add_argument("--group-by-length", action="store_true")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()

    started = time.time()
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    padding = {"padding": "max_length", "max_length": args.pad_to} if args.pad_to else {}

    def dataset(path: str, column: str, limit: int | None) -> datasets.Dataset:
        texts, labels = read_tsv(path, column, limit)
        enc = tokenizer(texts, truncation=True, max_length=args.pad_to or 256, **padding)
        return datasets.Dataset.from_dict({**enc, "labels": labels})

    train = dataset(args.train, "sentence", args.samples)
    dev = dataset(args.dev, "content", None)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=args.lr,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=42,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)
    )
    result = trainer.train()
    predictions = trainer.predict(dev)
    accuracy = float((np.argmax(predictions.predictions, -1) == predictions.label_ids).mean())
    model.save_pretrained(args.output_dir)
    tokens = sum(sum(m) for m in train["attention_mask"]) * args.epochs
    padded = sum(len(m) for m in train["attention_mask"]) * args.epochs
    print(
        json.dumps(
            {
                "dev_accuracy": accuracy,
                "train_runtime_s": result.metrics["train_runtime"],
                "samples_per_second": result.metrics["train_samples_per_second"],
                "wall_time_s": time.time() - started,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "real_tokens": tokens,
                "padding_fraction_upper_bound": 1 - tokens / padded if args.pad_to else None,
            }
        )
    )


if __name__ == "__main__":
    main()
