"""The plain-library way of a fine-tuning job: transformers Trainer + peft, written the way people write it by hand.

    python -m bench.baselines.plain_trainer --job sst2 --method lora --model DIR --train train.tsv --dev dev.tsv
    ... --pad-to 256            # (a) the typical script: every example padded to a fixed length
    ... --group-by-length       # (b) the best plain-library way: dynamic padding + length-grouped batches

Jobs: `sst2` (sequence classification, label/sentence TSV), `ner` (token classification, CoNLL column file, labels
on the first sub-word), `sft` (causal-LM instruction tuning on Alpaca JSON, loss on the response only). Methods:
`full`, `lora` (query/value or c_attn/q,v; r=8, alpha 16), `qlora` (4-bit NF4 + double quant through
bitsandbytes, then LoRA). Without `--pad-to`, batches are padded to their longest member. Prints one JSON line:
throughput (samples/s, real tokens/s), the padding fraction actually computed, peak memory, wall time and the metric
on `--dev` (unless `--max-steps` makes it a throughput-only measurement).

This file deliberately uses no ftctl code: it is what ftctl is measured against.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import time
from typing import Any

import numpy as np

started = time.time()


class Counting:
    """Wraps a collator and counts the token slots it hands to the model and how many of them are real."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.slots = 0
        self.real = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        self.slots += batch["input_ids"].numel()
        self.real += int(batch["attention_mask"].sum())
        return batch


def read_sst2(path: str, limit: int | None) -> dict[str, list]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    column = "sentence" if "sentence" in rows[0] else "content"
    return {"text": [r[column] for r in rows], "label": [int(r["label"]) for r in rows]}


def read_conll(path: str, limit: int | None) -> dict[str, list]:
    sentences, words, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                if words:
                    sentences.append((words, tags))
                    words, tags = [], []
                continue
            words.append(parts[0])
            tags.append(parts[-1])
    if words:
        sentences.append((words, tags))
    sentences = sentences[:limit] if limit else sentences
    return {"words": [s[0] for s in sentences], "tags": [s[1] for s in sentences]}


ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)


def read_alpaca(path: str, limit: int | None, skip: int = 0) -> list[dict]:
    rows = json.load(open(path, encoding="utf-8"))[skip:]
    return rows[:limit] if limit else rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", choices=("sst2", "ner", "sft"), required=True)
    parser.add_argument("--method", choices=("full", "lora", "qlora"), default="lora")
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--dev", help="scored after training (default for sft: held-out rows of --train)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--dev-samples", type=int)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after N steps: a throughput-only run")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--pad-to", type=int, default=None)
    parser.add_argument("--group-by-length", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (Trainer's bf16=True)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--targets", nargs="+", default=None, help="LoRA target modules (default: attention q/v)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()

    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    padding = {"padding": "max_length"} if args.pad_to else {}
    max_length = args.pad_to or args.max_length

    if args.job == "sst2":

        def dataset(path: str, limit: int | None) -> datasets.Dataset:
            raw = read_sst2(path, limit)
            enc = tokenizer(raw["text"], truncation=True, max_length=max_length, **padding)
            return datasets.Dataset.from_dict({**enc, "labels": raw["label"]})

        train, dev = dataset(args.train, args.samples), dataset(args.dev, args.dev_samples)
        auto, extra = AutoModelForSequenceClassification, {"num_labels": 2}
        collator = DataCollatorWithPadding(tokenizer)
        task_type = "SEQ_CLS"
    elif args.job == "ner":
        raw_train = read_conll(args.train, args.samples)
        names = sorted({t for tags in raw_train["tags"] for t in tags})
        label_id = {n: i for i, n in enumerate(names)}

        def dataset(raw: dict[str, list]) -> datasets.Dataset:
            enc = tokenizer(raw["words"], is_split_into_words=True, truncation=True, max_length=max_length, **padding)
            labels = []
            for i, tags in enumerate(raw["tags"]):
                previous, row = None, []
                for word in enc.word_ids(i):
                    row.append(-100 if word is None or word == previous else label_id.get(tags[word], 0))
                    previous = word
                labels.append(row)
            return datasets.Dataset.from_dict({**enc, "labels": labels})

        train, dev = dataset(raw_train), dataset(read_conll(args.dev, args.dev_samples))
        auto, extra = AutoModelForTokenClassification, {"num_labels": len(names)}
        collator = DataCollatorForTokenClassification(tokenizer)
        task_type = "TOKEN_CLS"
    else:

        def dataset(rows: list[dict]) -> datasets.Dataset:
            out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
            for r in rows:
                template = ALPACA_INPUT if r.get("input") else ALPACA
                prompt = tokenizer(template.format(**r), add_special_tokens=False)["input_ids"]
                target = tokenizer(r["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                ids = (prompt + target)[:max_length]
                labels = ([-100] * len(prompt) + target)[:max_length]
                pad = (args.pad_to - len(ids)) if args.pad_to else 0
                out["input_ids"].append(ids + [tokenizer.pad_token_id] * pad)
                out["attention_mask"].append([1] * len(ids) + [0] * pad)
                out["labels"].append(labels + [-100] * pad)
            return datasets.Dataset.from_dict(out)

        train = dataset(read_alpaca(args.train, args.samples))
        dev = dataset(read_alpaca(args.dev or args.train, args.dev_samples, skip=0 if args.dev else args.samples))
        auto, extra, collator = AutoModelForCausalLM, {}, DataCollatorForTokenClassification(tokenizer)
        task_type = "CAUSAL_LM"

    load: dict[str, Any] = dict(extra)
    if args.method == "qlora":
        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=["classifier", "pooler", "score", "lm_head"],  # heads stay in full precision
        )  # fmt: skip
    model = auto.from_pretrained(args.model, **load)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if args.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing and args.method == "lora":
        model.enable_input_require_grads()
    if args.method in ("lora", "qlora"):
        targets = args.targets or {"gpt2": ["c_attn"], "t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}.get(
            model.config.model_type, ["query", "value"]
        )
        model = get_peft_model(
            model,
            LoraConfig(
                task_type=task_type, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.1, target_modules=targets
            ),
        )
    counting = Counting(collator)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        learning_rate=args.lr,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=42,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU needs it said
        gradient_checkpointing=args.gradient_checkpointing,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=counting)
    result = trainer.train()
    train_slots, train_real = counting.slots, counting.real

    metric: dict[str, float] = {}
    if args.max_steps < 0:
        trainer.data_collator = collator
        predictions = trainer.predict(dev)
        if args.job == "sst2":
            metric["accuracy"] = float((np.argmax(predictions.predictions, -1) == predictions.label_ids).mean())
        elif args.job == "ner":
            from seqeval.metrics import f1_score

            guess, gold = np.argmax(predictions.predictions, -1), predictions.label_ids
            keep = gold != -100
            metric["f1"] = float(
                f1_score(
                    [[names[g] for g in row[k]] for row, k in zip(gold, keep, strict=True)],
                    [[names[p] for p in row[k]] for row, k in zip(guess, keep, strict=True)],
                )
            )
        else:
            metric["eval_loss"] = float(predictions.metrics["test_loss"])
    seconds = result.metrics["train_runtime"]
    print(
        json.dumps(
            {
                "samples_per_second": result.metrics["train_samples_per_second"],
                "real_tokens_per_second": train_real / seconds,
                "padding_fraction": 1 - train_real / train_slots if train_slots else None,
                "train_runtime_s": seconds,
                "train_samples": int(round(result.metrics["train_samples_per_second"] * seconds)),
                "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20
                if torch.cuda.is_available()
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "wall_time_s": time.time() - started,
                "metrics": metric,
            }
        )
    )


if __name__ == "__main__":
    main()
