"""Performance: ftctl against the plain transformers/peft way of the same job, measured in one invocation.

    python -m bench.run                                  # every scenario (about 20 minutes on 2 CPU cores)
    python -m bench.run --scenarios sst2_lora t5_generation
    python -m bench.run --list

Each scenario runs ftctl as a user would (`ftctl train` / `ftctl evaluate` processes, ftctl's defaults unless the
scenario says otherwise) and, in the same invocation, the baselines of issue 7:

- (a) the typical hand-written script: transformers Trainer, every example padded to a fixed length, peft LoRA (or
  the scenario's method); it runs about 10x slower, so it is timed over a fixed number of optimizer steps
  (throughput only, no metric);
- (b) the best plain-library way: Trainer with dynamic padding and `group_by_length`, the whole job, scored.

On a CUDA machine the default is the GPU scenarios instead: Llama-3-8B- and 1B-shaped models with random weights,
bf16, sequences of 2,048 tokens, micro-batch 1, gradient checkpointing, LoRA / QLoRA / full (1B), with tokens/s,
MFU (6 x parameters x tokens/s over the bf16 matmul rate measured on the device) and peak memory against (b);
`--gpu-shape tiny` runs the same commands on a tiny shape, a check that works on a CPU.

Both are `bench/baselines/plain_trainer.py`, which uses no ftctl code. Results: bench/results/perf_cpu.{md,json}
(perf_gpu on a CUDA machine) and a dated entry in bench/RESULTS.md, with the machine, library versions, every
command, and per row samples/s, real (non-pad) tokens/s, the padding fraction computed, peak memory, wall time, the
metric reached, and ratios to baseline (b) and (a). Whole-process speed (trained samples / process wall time,
start-up, tokenization, evaluation and saving included) is reported beside the training speed.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.common import OUT, ftctl, machine, machine_line, need_data, run, save, versions

PERF = OUT / "perf"
PY = sys.executable


@dataclass
class Row:
    """One measured command of a scenario."""

    label: str
    kind: str  # ftctl | baseline_a | baseline_b | reference
    command: list[str]
    read: Callable[[Path, float], dict[str, Any]]  # (log path, process wall seconds) -> measured numbers
    note: str = ""


@dataclass
class Scenario:
    name: str
    description: str
    rows: Callable[[], list[Row]]
    metric: str
    speed: str = "samples_per_second"  # the throughput the ratios compare
    target: tuple[float, str] | None = None  # (ratio, versus which kind) the issue asks for
    # runs of the ftctl and baseline (b) rows; the one with the median speed is reported, all speeds are kept (this
    # machine's speed varies by 10-20% from one process to the next)
    repeats: int = 1
    results: list[dict[str, Any]] = field(default_factory=list)


# ---- reading what a command measured ------------------------------------------------------------------------------
def last_json(log: Path) -> dict[str, Any]:
    return json.loads(log.read_text().strip().splitlines()[-1])


def baseline_reader(metric: str) -> Callable[[Path, float], dict[str, Any]]:
    def read(log: Path, wall: float) -> dict[str, Any]:
        out = last_json(log)
        out["metric"] = out["metrics"].get(metric)
        out["whole_process_samples_per_second"] = out["train_samples"] / wall
        return out

    return read


def ftctl_reader(run_dir: Path, metric: str, split: str = "test_metrics") -> Callable[[Path, float], dict[str, Any]]:
    def read(log: Path, wall: float) -> dict[str, Any]:
        record = json.loads((run_dir / "run.json").read_text())
        seconds = record["train_runtime_s"]
        samples = record["samples_per_second"] * seconds
        scored = record.get(split) or record["metrics"]
        return {
            "samples_per_second": record["samples_per_second"],
            "real_tokens_per_second": record["train_real_tokens"] / seconds,
            "padding_fraction": record["padding_fraction"],
            "train_runtime_s": seconds,
            "train_samples": round(samples),
            "peak_memory_mb": record["peak_memory_mb"],
            "whole_process_samples_per_second": samples / wall,
            "metric": scored.get(metric),
            "precision": record.get("precision"),
            **plan_columns(record.get("plan")),
        }

    return read


def plan_columns(plan: dict[str, Any] | None) -> dict[str, Any]:
    """What `ftctl plan` predicted for a run (run.json's `plan`, made before any weight was read) beside what the run
    measured (on CUDA: torch.cuda.max_memory_allocated), and the relative error (measured / predicted - 1)."""
    if not plan:
        return {}
    return {
        "plan_peak_memory_mb": plan["predicted"]["peak_memory_mb"],
        "plan_measured_peak_memory_mb": plan["measured"]["peak_memory_mb"],
        "plan_memory_error": plan["error"]["peak_memory"],
        "plan_train_seconds": plan["predicted"]["train_seconds"],
        "plan_time_error": plan["error"]["train_time"],
    }


# ---- data ---------------------------------------------------------------------------------------------------------
def sst2_files() -> dict[str, Path]:
    """The first 2,000 SST-2 training sentences (what both sides train on), the next 200 (ftctl's validation split
    for choosing the best epoch; the baseline does not select), and dev.tsv (what both are scored on; its text
    column renamed from `content` to the training files' `sentence`)."""
    train, dev = need_data("glue_sst2/train.tsv", "glue_sst2/dev.tsv")
    folder = PERF / "data"
    folder.mkdir(parents=True, exist_ok=True)

    def rows(path: Path) -> list[list[str]]:
        with open(path, encoding="utf-8") as f:
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))

    body, dev_rows = rows(train)[1:], rows(dev)[1:]
    parts = {"train": body[:2000], "val": body[2000:2200], "dev": dev_rows}
    out = {}
    for name, part in parts.items():
        out[name] = folder / f"sst2_{name}.tsv"
        with open(out[name], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
            writer.writerows([["label", "sentence"], *part])
    return out


def minilm() -> str:
    from ftctl.models import embedded_model_dir

    return embedded_model_dir()


# ---- scenarios ----------------------------------------------------------------------------------------------------
def plain_rows(plain: list[str], name: str, metric: str, pad_to: int, a_steps: int) -> list[Row]:
    """Baselines (b), the whole job, and (a), padded to `pad_to` and timed over `a_steps` optimizer steps."""
    return [
        Row("plain (b): dynamic padding + group_by_length", "baseline_b",
            [*plain, "--group-by-length", "--output-dir", str(PERF / f"{name}-plain-b")], baseline_reader(metric)),
        Row(f"plain (a): padded to {pad_to}, {a_steps} steps", "baseline_a",
            [*plain, "--pad-to", str(pad_to), "--max-steps", str(a_steps), "--output-dir",
             str(PERF / f"{name}-plain-a")], baseline_reader(metric), note="throughput only"),
    ]  # fmt: skip


def sst2_scenario(
    method: str,
    epochs: int,
    a_steps: int,
    references: tuple[tuple[str, list[str], list[str]], ...] = (),
) -> Callable[[], list[Row]]:
    """ftctl with its defaults, the two plain baselines, and reference rows: (label, extra ftctl options,
    environment settings), each the measurement behind one default (e.g. ftctl at another precision than its auto
    choice)."""

    def rows() -> list[Row]:
        files, model = sst2_files(), minilm()
        out = PERF / f"sst2-{method}"
        train = [
            ftctl(), "train", "--task", "sst2", "--method", method, "--model", model,
            "--train-file", str(files["train"]), "--validation-file", str(files["val"]), "--test-file",
            str(files["dev"]), "--epochs", str(epochs), "--report-to", "none",
            "--output-dir", str(out), "--overwrite",
        ]  # fmt: skip
        plain = [
            PY, "-m", "bench.baselines.plain_trainer", "--job", "sst2", "--method", method, "--model", model,
            "--train", str(files["train"]), "--dev", str(files["dev"]), "--samples", "2000", "--epochs", str(epochs),
            "--lr", "5e-5" if method == "full" else "5e-4",
        ]  # fmt: skip
        other = []
        for i, (label, options, env) in enumerate(references):
            alt = PERF / f"sst2-{method}-reference-{i}"
            command = [*(["env", *env] if env else []), *train[: train.index("--output-dir")], *options,
                       "--output-dir", str(alt), "--overwrite"]  # fmt: skip
            other.append(Row(label, "reference", command, ftctl_reader(alt, "accuracy")))
        return [
            Row("ftctl (defaults)", "ftctl", train, ftctl_reader(out, "accuracy")),
            *other,
            *plain_rows(plain, f"sst2-{method}", "accuracy", 256, a_steps),
        ]

    return rows


def ner_rows() -> list[Row]:
    train, dev = need_data("conll2003/eng.train", "conll2003/eng.testa")
    model, out = minilm(), PERF / "ner-lora"
    cmd = [
        ftctl(), "train", "--task", "conll2003", "--method", "lora", "--model", model, "--train-file", str(train),
        "--validation-file", str(dev), "--max-train-samples", "1000", "--max-eval-samples", "500", "--epochs", "1",
        "--report-to", "none", "--output-dir", str(out), "--overwrite",
    ]  # fmt: skip
    plain = [
        PY, "-m", "bench.baselines.plain_trainer", "--job", "ner", "--method", "lora", "--model", model, "--train",
        str(train), "--dev", str(dev), "--samples", "1000", "--dev-samples", "500", "--epochs", "1", "--lr", "1e-3",
    ]  # fmt: skip
    return [
        Row("ftctl (defaults)", "ftctl", cmd, ftctl_reader(out, "f1", split="metrics")),
        *plain_rows(plain, "ner", "f1", 256, 20),
    ]


def tiny_generative_models() -> dict[str, Path]:
    from bench.tasks_generative import corpus
    from bench.tiny_models import build_models

    (alpaca,) = need_data("alpaca/alpaca_data_1k.json")
    folder = PERF / "tiny-models"
    if not all((folder / f / "config.json").exists() for f in ("t5", "llama")):
        build_models(corpus([alpaca]), folder, families=("t5", "llama"), size="small")
    return {"t5": folder / "t5", "llama": folder / "llama"}


def summaries_file() -> tuple[Path, Path]:
    """A summarization set from Alpaca 1k (document: the response, summary: the instruction): real English text of
    varied length for generation throughput; train: the first 100 rows, evaluation: the next 300."""
    (alpaca,) = need_data("alpaca/alpaca_data_1k.json")
    rows = json.loads(alpaca.read_text(encoding="utf-8"))
    folder = PERF / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("summaries_train.jsonl", rows[:100]), ("summaries_eval.jsonl", rows[100:400])):
        with open(folder / name, "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps({"document": r["output"], "summary": r["instruction"]}) + "\n")
        paths.append(folder / name)
    return paths[0], paths[1]


GENERATION_TOKENS = 32


def t5_generation_rows() -> list[Row]:
    model = tiny_generative_models()["t5"]
    train, evaluation = summaries_file()
    out = PERF / "t5-summarization"
    common = ["--max-new-tokens", str(GENERATION_TOKENS), "--max-length", "512"]
    setup = [
        ftctl(), "train", "--task", "summarization", "--method", "full", "--model", str(model), "--train-file",
        str(train), "--max-steps", "1", "--eval-strategy", "no", "--save-strategy", "no", "--report-to", "none",
        *common, "--output-dir", str(out), "--overwrite",
    ]  # fmt: skip
    scored = PERF / "t5-summarization-eval.json"
    evaluate = [ftctl(), "evaluate", str(out), "--data", str(evaluation), "--output", str(scored)]

    def read_ftctl(log: Path, wall: float) -> dict[str, Any]:
        result = json.loads(scored.read_text())
        speed = result["details"]["speed"]
        return {
            "examples_per_second": speed["samples_per_second"],
            "runtime_s": speed["runtime"],
            "whole_process_examples_per_second": result["info"]["examples"] / wall,
            "metric": result.get("rougeL"),
        }

    def read_plain(log: Path, wall: float) -> dict[str, Any]:
        out = last_json(log)
        out["metric"] = out["rougeL"]
        return out

    single = [  # the same weights: the run directory holds the whole model
        PY, "-m", "bench.baselines.plain_generate", "--model", str(out), "--data", str(evaluation),
        "--prefix", "summarize: ", "--max-new-tokens", str(GENERATION_TOKENS), "--max-length", "512",
    ]  # fmt: skip
    return [
        Row("ftctl train (1 step, to have a run to evaluate)", "setup", setup, lambda log, wall: {}),
        Row("ftctl evaluate (batched, sorted by length, KV cache)", "ftctl", evaluate, read_ftctl),
        Row("plain: one example at a time, model.generate", "baseline_b", single, read_plain),
    ]


def sft_rows() -> list[Row]:
    model = tiny_generative_models()["llama"]
    (alpaca,) = need_data("alpaca/alpaca_data_1k.json")
    rows = json.loads(alpaca.read_text(encoding="utf-8"))
    held = PERF / "data" / "alpaca_heldout.json"
    held.parent.mkdir(parents=True, exist_ok=True)
    held.write_text(json.dumps(rows[800:900]))
    cmd = [
        ftctl(), "train", "--task", "alpaca", "--method", "full", "--model", str(model), "--train-file", str(alpaca),
        "--validation-file", str(held), "--max-train-samples", "800", "--epochs", "1", "--batch-size", "8",
        "--learning-rate", "1e-3", "--max-length", "512", "--report-to", "none", "--overwrite",
    ]  # fmt: skip
    plain = [
        PY, "-m", "bench.baselines.plain_trainer", "--job", "sft", "--method", "full", "--model", str(model),
        "--train", str(alpaca), "--samples", "800", "--dev-samples", "100", "--epochs", "1", "--batch-size", "8",
        "--lr", "1e-3", "--max-length", "512",
    ]  # fmt: skip
    packed, padded = PERF / "sft-packed", PERF / "sft-padded"
    return [
        Row(
            "ftctl --packing",
            "ftctl",
            [*cmd, "--packing", "--output-dir", str(packed)],
            ftctl_reader(packed, "perplexity", split="metrics"),
        ),
        Row(
            "ftctl without packing (dynamic padding, length groups)",
            "reference",
            [*cmd, "--output-dir", str(padded)],
            ftctl_reader(padded, "perplexity", split="metrics"),
        ),
        *plain_rows(plain, "sft", "eval_loss", 512, 10),
    ]


# ---- GPU scenarios: Llama-3-shaped models with random weights, bf16, sequences of 2,048 tokens ---------------------
# shape -> LlamaConfig fields (Llama-3.1-8B and Llama-3.2-1B; "tiny" runs the same commands on a CPU, as a check)
GPU_SHAPES: dict[str, dict[str, Any]] = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 2000, "tie_word_embeddings": False},
}  # fmt: skip
GPU_SEQUENCE = 2048
GPU_STEPS = 20  # optimizer steps per row, micro-batch 1, after which the rows stop (throughput runs)
SHAPE_OVERRIDE: str | None = None  # --gpu-shape: run the GPU scenarios' commands on another shape


def gpu_model(shape: str) -> tuple[Path, int]:
    """A random-weight Llama of `shape` saved in bf16 with a small byte-level BPE tokenizer (token ids stay below
    the model's vocabulary); returns its directory and parameter count. Built once per shape."""
    import torch
    import transformers as t
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = PERF / "gpu-models" / shape
    facts = folder / "params.json"
    if facts.is_file():
        return folder, json.loads(facts.read_text())["params"]
    words = gpu_words()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(words[i : i + 50]) for i in range(0, len(words), 50)],
                            trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>", "<unk>"]))  # fmt: skip
    tokenizer = t.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = t.LlamaConfig(**GPU_SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = t.LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":  # the measured rows are other processes: leave them the GPU
        torch.cuda.empty_cache()
    facts.write_text(json.dumps({"params": params}))
    return folder, params


def gpu_words() -> list[str]:
    import random

    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ren", "tas", "vu", "sol", "ne", "dri", "pa", "gor", "el", "ith", "um"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(20000)]


def gpu_data(examples: int) -> Path:
    """Alpaca-format examples longer than the sequence: every row fills all 2,048 positions, so no padding and
    equal work per step for ftctl and the baselines."""
    path = PERF / "data" / f"gpu_sft_{examples}_v2.json"
    if not path.is_file():
        import random

        rng, words = random.Random(1), gpu_words()
        # ftctl keeps at most half the sequence for the response of a decoder and gives the prompt the rest; the
        # plain script fills the sequence with prompt then response: a long input and a longer response fill both
        rows = [{"instruction": "Continue the text.", "input": " ".join(rng.choices(words, k=1500)),
                 "output": " ".join(rng.choices(words, k=3000))} for _ in range(examples)]  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    return path


@functools.cache
def peak_bf16_flops() -> float:
    """The device's measured bf16 matrix-multiply rate (FLOP/s): the MFU denominator."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * n**3 / best


def with_mfu(
    read: Callable[[Path, float], dict[str, Any]], params: int, flops: float
) -> Callable[[Path, float], dict[str, Any]]:
    """A reader that adds the model FLOPs utilisation: 6 x parameters x tokens/s over the measured matmul rate."""

    def wrapped(log: Path, wall: float) -> dict[str, Any]:
        measured = read(log, wall)
        tokens = measured.get("real_tokens_per_second") or 0
        measured.update(mfu=6 * params * tokens / flops, params=params, peak_flops=flops)
        return measured

    return wrapped


def gpu_scenario(shape: str, method: str) -> Callable[[], list[Row]]:
    """ftctl and the plain Trainer (b) on the same random-weight model and data: bf16, micro-batch 1, sequence 2,048,
    gradient checkpointing, LoRA on q_proj/v_proj r=8 (both sides), GPU_STEPS steps. (a) is not run: every
    sequence is already full length, so fixed-length padding changes nothing here."""

    def rows() -> list[Row]:
        model_dir, params = gpu_model(SHAPE_OVERRIDE or shape)
        flops = peak_bf16_flops()
        examples = GPU_STEPS + 2
        data = gpu_data(examples)
        out = PERF / f"gpu-{shape}-{method}"
        lora = ["--target-modules", "q_proj", "v_proj", "--lora-r", "8", "--lora-alpha", "16"]
        lora = lora if method != "full" else []
        train = [
            ftctl(), "train", "--task", "alpaca", "--method", method, "--model", str(model_dir), "--train-file",
            str(data), "--max-length", str(GPU_SEQUENCE), "--max-target-length", str(GPU_SEQUENCE), "--batch-size", "1",
            "--max-steps", str(GPU_STEPS),
            "--gradient-checkpointing", "--precision", "bf16", "--eval-strategy", "no", "--save-strategy", "no",
            "--num-samples", "0", "--report-to", "none", "--output-dir", str(out), "--overwrite", *lora,
        ]  # fmt: skip
        plain = [
            PY, "-m", "bench.baselines.plain_trainer", "--job", "sft", "--method", method, "--model", str(model_dir),
            "--train", str(data), "--samples", str(GPU_STEPS), "--dev-samples", "2", "--max-steps", str(GPU_STEPS),
            "--batch-size", "1", "--max-length", str(GPU_SEQUENCE), "--bf16", "--gradient-checkpointing",
            "--group-by-length", "--lr", "1e-4", "--output-dir", str(out) + "-plain-b",
        ]  # fmt: skip

        return [
            Row("ftctl", "ftctl", train, with_mfu(ftctl_reader(out, "perplexity", split="metrics"), params, flops)),
            Row("plain (b): Trainer, dynamic padding + group_by_length", "baseline_b", plain,
                with_mfu(baseline_reader("eval_loss"), params, flops)),
        ]  # fmt: skip

    return rows


GPU_SCENARIOS = [
    Scenario("gpu_8b_lora", "Llama-3-8B shape (random weights), bf16, seq 2,048, micro-batch 1, gradient "
             "checkpointing, LoRA q/v r=8", gpu_scenario("8b", "lora"), "perplexity / eval loss",
             speed="real_tokens_per_second", target=(1.3, "baseline_b")),
    Scenario("gpu_8b_qlora", "Llama-3-8B shape, QLoRA 4-bit NF4 + double quant, otherwise as gpu_8b_lora",
             gpu_scenario("8b", "qlora"), "perplexity / eval loss", speed="real_tokens_per_second"),
    Scenario("gpu_1b_lora", "Llama-3.2-1B shape, as gpu_8b_lora", gpu_scenario("1b", "lora"),
             "perplexity / eval loss", speed="real_tokens_per_second"),
    Scenario("gpu_1b_qlora", "Llama-3.2-1B shape, QLoRA", gpu_scenario("1b", "qlora"), "perplexity / eval loss",
             speed="real_tokens_per_second"),
    Scenario("gpu_1b_full", "Llama-3.2-1B shape, full fine-tuning", gpu_scenario("1b", "full"),
             "perplexity / eval loss", speed="real_tokens_per_second"),
]  # fmt: skip
CPU_SCENARIOS = ("sst2_lora", "sst2_full", "sst2_qlora", "ner_lora", "t5_generation", "sft_packing")


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("sst2_lora", "MiniLM, SST-2: 2,000 sentences, 2 epochs, LoRA; scored on dev.tsv (872)",
                 sst2_scenario("lora", 2, 20, references=(
                     ("ftctl --precision fp32", ["--precision", "fp32"], []),
                     ("ftctl --lora-dropout 0 (PEFT's default)", ["--lora-dropout", "0"], []),
                     ("ftctl with torch's dropout (FTCTL_CPU_DROPOUT=0)", [], ["FTCTL_CPU_DROPOUT=0"]),
                 )), "accuracy", target=(1.3, "baseline_b"),
                 repeats=3),
        Scenario("sst2_full", "MiniLM, SST-2: 2,000 sentences, 1 epoch, full fine-tuning; scored on dev.tsv",
                 sst2_scenario("full", 1, 10, references=(("ftctl --precision bf16", ["--precision", "bf16"], []),)),
                 "accuracy"),
        Scenario("sst2_qlora", "MiniLM, SST-2: 2,000 sentences, 1 epoch, QLoRA (4-bit NF4); scored on dev.tsv",
                 sst2_scenario("qlora", 1, 5), "accuracy"),
        Scenario("ner_lora", "MiniLM, CoNLL-2003 NER: 1,000 sentences, 1 epoch, LoRA; entity F1 on 500 of eng.testa",
                 ner_rows, "f1"),
        Scenario("t5_generation", "tiny T5 (random weights), summarization evaluation: 300 documents, "
                 f"{GENERATION_TOKENS} new tokens at most, greedy", t5_generation_rows, "rougeL",
                 speed="examples_per_second", target=(5.0, "baseline_b")),
        Scenario("sft_packing", "tiny Llama (random weights), Alpaca instruction tuning: 800 examples, 1 epoch, full",
                 sft_rows, "perplexity / eval loss", speed="real_tokens_per_second"),
        *GPU_SCENARIOS,
    ]
}  # fmt: skip


def run_scenario(scenario: Scenario, keep_going: bool = False, timeout: float | None = None) -> None:
    """Every row of `scenario`, measured. `keep_going` (a device lease: one failure must not cost the other rows) keeps
    a failed or timed-out row as its exit code and log tail, and runs the next; else a failure ends the benchmark."""
    for row in scenario.rows():
        runs = []
        for attempt in range(scenario.repeats if row.kind in ("ftctl", "baseline_b") else 1):
            log = PERF / "logs" / f"{scenario.name}-{row.kind}-{attempt}.log"
            if not keep_going:
                wall = run(row.command, log)
            else:
                wall, code = common.attempt(row.command, log, timeout)
                if code:
                    tail = log.read_text(errors="replace").strip().splitlines()[-12:]
                    runs.append({"process_wall_s": wall, "failed": f"exit {code}", "log_tail": tail})
                    print(f"{scenario.name} / {row.label}: FAILED (exit {code}, {wall:.0f} s): {log}", flush=True)
                    break
            measured = {"process_wall_s": wall, **row.read(log, wall)}
            runs.append(measured)
            print(f"{scenario.name} / {row.label}: {measured.get(scenario.speed)} ({wall:.0f} s)", flush=True)
        runs.sort(key=lambda m: m.get(scenario.speed) or 0)
        median = runs[len(runs) // 2]
        command = " ".join(str(c) for c in row.command).replace(str(OUT), "bench/out").replace(PY, "python")
        entry = {"label": row.label, "kind": row.kind, "note": row.note, "command": command, **median}
        if len(runs) > 1:
            entry["all_speeds"] = [m.get(scenario.speed) for m in runs]
        scenario.results.append(entry)


def ratios(scenario: Scenario) -> None:
    by_kind = {r["kind"]: r for r in scenario.results}
    for r in scenario.results:
        for kind in ("baseline_b", "baseline_a"):
            base = by_kind.get(kind)
            if base and base is not r and r.get(scenario.speed) and base.get(scenario.speed):
                r[f"ratio_vs_{kind}"] = r[scenario.speed] / base[scenario.speed]
            whole = "whole_process_samples_per_second"
            if base and base is not r and r.get(whole) and base.get(whole):
                r[f"whole_process_ratio_vs_{kind}"] = r[whole] / base[whole]


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(scenarios: list[Scenario], started: float) -> str:
    lines = [
        "# Performance: ftctl vs the plain transformers/peft way, same machine, same invocation",
        "",
        machine_line(),
        f"- `python -m bench.run --scenarios {' '.join(s.name for s in scenarios)}` "
        f"({(time.time() - started) / 60:.1f} minutes)",
        "- (a) Trainer, every example padded to a fixed length (timed over a few steps: throughput only); (b) Trainer "
        "with dynamic padding and group_by_length (the whole job, scored). Ratios: this row's speed over the "
        "baseline's; whole-process: trained samples over the process's wall time (start-up, tokenization, "
        "evaluation and saving included)",
        "",
    ]
    for s in scenarios:
        lines += [f"## {s.name}: {s.description}", ""]
        if s.name.startswith("gpu_"):
            lines += ["| row | real tokens/s | MFU | peak MB | train s | process wall s | vs (b) tokens/s | "
                      "peak memory vs (b) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            base = next((r for r in s.results if r["kind"] == "baseline_b"), {})
            for r in s.results:
                memory = (r.get("peak_memory_mb") or 0) / base["peak_memory_mb"] if base.get("peak_memory_mb") else None
                lines.append(
                    f"| {r['label']} | {fmt(r.get('real_tokens_per_second'), 0)} | {fmt(100 * r.get('mfu', 0), 1)}% | "
                    f"{fmt(r.get('peak_memory_mb'), 0)} | {fmt(r.get('train_runtime_s'), 0)} | "
                    f"{fmt(r['process_wall_s'], 0)} | {fmt(r.get('ratio_vs_baseline_b'), 2)} | "
                    f"{'-' if r is base or memory is None else fmt(memory, 2)} |"
                )
            first = s.results[0] if s.results else {}
            lines += [
                "",
                f"MFU = 6 x {fmt(first.get('params'), 0)} parameters x real tokens/s / "
                f"{fmt((first.get('peak_flops') or 0) / 1e12, 1)} TFLOP/s (bf16 matmul measured on this device); "
                "LoRA and QLoRA skip the weight gradients of the frozen base, so their MFU is bounded near 4/6.",
            ]
            if s.name == "gpu_8b_qlora":
                mine = next((r for r in s.results if r["kind"] == "ftctl"), {})
                gib = (mine.get("peak_memory_mb") or 0) / 1024
                lines += ["", f"Target: QLoRA 8B peak memory <= 10 GiB: {gib:.2f} GiB, "
                          f"{'met' if mine and gib <= 10 else 'NOT met'}."]  # fmt: skip
        elif s.speed == "examples_per_second":
            lines += ["| row | examples/s | eval s | process wall s | ROUGE-L | ratio vs one-at-a-time |",
                      "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
            for r in s.results:
                if r["kind"] == "setup":
                    continue
                lines.append(
                    f"| {r['label']} | {fmt(r.get('examples_per_second'))} | {fmt(r.get('runtime_s'))} | "
                    f"{fmt(r['process_wall_s'], 0)} | {fmt(r.get('metric'), 4)} | "
                    f"{fmt(r.get('ratio_vs_baseline_b'), 2)} |"
                )
        else:
            lines += [
                f"| row | samples/s | real tokens/s | padding | peak MB | train s | process wall s | {s.metric} | "
                "vs (b) | vs (a) | whole-process vs (b) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in s.results:
                pad = r.get("padding_fraction")
                lines.append(
                    f"| {r['label']} | {fmt(r.get('samples_per_second'))} | {fmt(r.get('real_tokens_per_second'), 0)} "
                    f"| {'-' if pad is None else f'{100 * pad:.1f}%'} | {fmt(r.get('peak_memory_mb'), 0)} | "
                    f"{fmt(r.get('train_runtime_s'), 0)} | {fmt(r['process_wall_s'], 0)} | "
                    f"{fmt(r.get('metric'), 4) if r.get('metric') is not None else r['note'] or '-'} | "
                    f"{fmt(r.get('ratio_vs_baseline_b'), 2)} | {fmt(r.get('ratio_vs_baseline_a'), 2)} | "
                    f"{fmt(r.get('whole_process_ratio_vs_baseline_b'), 2)} |"
                )
        spreads = [
            f"{r['label']}: " + ", ".join(fmt(v) for v in r["all_speeds"]) for r in s.results if "all_speeds" in r
        ]
        if spreads:
            lines += ["", f"Repeated runs ({s.speed}; the median run is shown): " + "; ".join(spreads) + "."]
        if s.target:
            ratio, kind = s.target
            mine = next((r for r in s.results if r["kind"] == "ftctl"), {})
            got = mine.get(f"ratio_vs_{kind}")
            verdict = "met" if got is not None and got >= ratio else "NOT met"
            lines += ["", f"Target: >= {ratio:g}x {kind.replace('_', ' ')} ({s.speed}): {fmt(got, 2)}x, {verdict}."]
        lines += ["", "Commands:", ""] + [f"- {r['label']}: `{r['command']}`" for r in s.results] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=list(SCENARIOS),
        default=None,
        help="default: the GPU scenarios on a CUDA machine, else the CPU ones",
    )
    parser.add_argument(
        "--gpu-shape",
        choices=list(GPU_SHAPES),
        default=None,
        help="run the GPU scenarios' commands on this model shape (tiny: a check on the CPU)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--name", default=None, help="result file name (default: perf_cpu / perf_gpu)")
    args = parser.parse_args()
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name}: {s.description}")
        return
    import torch

    global SHAPE_OVERRIDE
    SHAPE_OVERRIDE = args.gpu_shape
    started = time.time()
    names = args.scenarios or ([s.name for s in GPU_SCENARIOS] if torch.cuda.is_available() else list(CPU_SCENARIOS))
    chosen = [SCENARIOS[n] for n in names]
    for scenario in chosen:
        run_scenario(scenario)
        ratios(scenario)
    text = markdown(chosen, started)
    name = args.name or ("perf_gpu" if torch.cuda.is_available() else "perf_cpu")
    if args.gpu_shape == "tiny":
        name = args.name or "perf_gpu_check"
    payload = {"machine": machine(), "versions": versions(), "scenarios": {s.name: s.results for s in chosen}}
    save(name, payload, text)
    print(text)


if __name__ == "__main__":
    main()
