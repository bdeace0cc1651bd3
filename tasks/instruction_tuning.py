"""Instruction tuning (supervised fine-tuning on prompt/response pairs): Alpaca and any instruction data.

The loss covers the response tokens (and the end-of-sequence token after them) only; the prompt is masked. Scored
by perplexity on held-out responses: exp(total negative log-likelihood / response tokens), token-weighted over the
whole split (not a mean of per-batch losses). The final evaluation also generates responses for the first
`--num-samples` prompts, written to predictions.jsonl beside each example's perplexity.

Data:
- Alpaca JSON/JSONL (`instruction`, optional `input`, `output`), rendered with the Stanford Alpaca prompt;
- prompt/completion JSONL (`prompt`, `completion`);
- conversations: OpenAI `messages` (`role`/`content`: system, user, assistant, tool) or ShareGPT `conversations`
  (`from`/`value`: system, human, gpt, tool), ending with the assistant's reply, rendered with the tokenizer's chat
  template when it has one, else with a plain `### User:` / `### Assistant:` layout. Decoders learn every assistant
  turn (`--train-on assistant`, the default), the last one (`last`) or every token (`all`): tasks/_conversations.py;
  the validation perplexity covers the same tokens, and generated samples answer the last user turn.
  Encoder-decoders learn the last reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from ftctl import dataio
from ftctl.errors import FtctlError
from ftctl.options import option
from tasks import _conversations as conversations
from tasks._generation import GenerationOptions, GenerationTask, special_ids
from tasks._prompts import PromptFormat, PromptSpec
from tasks.base import Preset, register_task

ALPACA_HEAD = (
    "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
)
FORMATS = {
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "chat": ("messages",),
    "conversations": ("conversations",),
}
CHAT_FORMATS = ("chat", "conversations")


@dataclass
class InstructionOptions(GenerationOptions):
    num_samples: int = option(4, "generate responses for this many validation prompts at the final evaluation")
    train_on: str = option(
        "assistant",
        "conversations: the tokens the loss covers: every assistant turn, the last one, or all tokens",
        choices=conversations.TRAIN_ON,
    )

    def validate(self) -> None:
        super().validate()
        if self.num_samples < 0:
            raise FtctlError(f"--num-samples must not be negative, got {self.num_samples}")


def data_format(columns: list[str]) -> str | None:
    for name, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    return None


@register_task
class InstructionTuningTask(GenerationTask):
    name = "instruction-tuning"
    description = "follow instructions: learn responses to prompts (supervised fine-tuning)"
    metrics = ("perplexity",)
    primary_metric = "perplexity"
    generates = False  # scored by perplexity; sample responses are generated at the end
    Options = InstructionOptions
    defaults = {"max_length": 512}
    max_new_tokens = 128
    max_target_length = 256
    # the data brings the instruction: a chat template gets it (and the input) as the user turn; without one the
    # Stanford Alpaca prompt is used (prompt/completion data: its own prompt)
    prompt_spec = PromptSpec(
        instruction="{instruction}",
        chat="{request}",
        plain="{request}",
        seq2seq="{request}",
        seq2seq_plain="{request}",
        fields=("instruction", "input", "request"),
        body="request",
    )
    presets = {
        "instruction": Preset(
            "generic: Alpaca JSON (instruction/input/output), prompt/completion, or conversations (OpenAI messages, "
            "ShareGPT conversations)"
        ),
        "alpaca": Preset("Stanford Alpaca, 52k instruction-following examples", hub=("tatsu-lab/alpaca", None)),
    }

    def sample_count(self) -> int:
        return int(self.opts.num_samples)

    def check_data(self, splits: dict[str, datasets.Dataset], training: bool) -> Mapping[str, Any]:
        for split, ds in splits.items():
            if len(ds) == 0:
                raise FtctlError(f"{split} data has no examples")
            if data_format(ds.column_names) is None:
                raise FtctlError(
                    f"{split} data is not instruction data; columns found: {', '.join(ds.column_names)} (expected "
                    "instruction/input/output, prompt/completion, messages or conversations)"
                )
            chat = data_format(ds.column_names) in CHAT_FORMATS
            for i, example in enumerate(ds):
                if chat:
                    conversations.turns_of(example, f"{split} data: conversation {i + 1}")
                elif not self.target(example):
                    raise FtctlError(f"{split} data: example {i + 1} has an empty response")
        return {}

    def read_file(self, path: str, what: str) -> datasets.Dataset:
        """JSON conversations are checked turn by turn before Arrow stores them (a turn of another shape would
        otherwise fail there, without saying which)."""
        if Path(path).suffix.lower() not in (".json", ".jsonl"):
            return super().read_file(path, what)
        rows = dataio.read_records(path, what)
        if conversations.column(list(rows[0])):
            for i, row in enumerate(rows):
                conversations.turns_of(row, f"{what} {path}: conversation {i + 1}")
        return dataio.dataset_of(rows, path, what)

    def rendering(self, fmt: PromptFormat | None = None) -> conversations.Rendering:
        fmt = fmt or self.prompt_format()
        return conversations.Rendering(fmt.tokenizer, chat=fmt.mode == "chat")

    def encode(self, ds: datasets.Dataset, tokenizer: Any) -> datasets.Dataset:
        """Conversations for decoders: every turn rendered and masked (tasks/_conversations.py); the rest as every
        generation task encodes."""
        if not self.decoder or data_format(ds.column_names) not in CHAT_FORMATS:
            return super().encode(ds, tokenizer)
        fmt = self.prompt_format(tokenizer)
        encoder = conversations.Encoder(
            tokenizer,
            self.rendering(fmt),
            min(self.cfg.max_length, tokenizer.model_max_length or self.cfg.max_length),
            str(self.opts.train_on),
            special_ids(tokenizer)[0],
        )

        def encode_batch(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_ids": [], "references": [], "length": []}
            for values in zip(*batch.values(), strict=True):
                example = dict(zip(batch, values, strict=True))
                encoded = encoder.encode(conversations.turns_of(example, "conversation"))
                out["input_ids"].append(encoded.input_ids)
                out["labels"].append(encoded.labels)
                out["prompt_ids"].append(encoded.prompt_ids)
                out["references"].append(self.references(example))
                out["length"].append(len(encoded.input_ids))
            return out

        encoded = ds.map(encode_batch, batched=True, remove_columns=ds.column_names, desc="tokenizing")
        encoder.report(len(ds))
        return encoded

    def _chat(self, example: dict[str, Any], fmt: PromptFormat | None = None) -> str:
        """A conversation before its last reply, rendered with the generation prompt (the chat template's, or the
        plain layout's)."""
        return self.rendering(fmt)(conversations.turns_of(example, "conversation")[:-1], generation_prompt=True)

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        form = data_format(ds.column_names) or ("prompt-completion" if "prompt" in ds.column_names else None)
        if form in CHAT_FORMATS:
            key = str(conversations.column(ds.column_names))
            role_key, text_key, _ = conversations.LAYOUTS[key]
            reply = {role_key: "assistant" if key == "messages" else "gpt", text_key: self.PLACEHOLDER}

            def answered(row: dict[str, Any]) -> dict[str, Any]:
                turns = list(row[key] or [])
                if turns and turns[-1].get(role_key) in ("assistant", "gpt"):
                    return {key: turns}
                return {key: [*turns, reply]}

            return ds.map(answered)
        return self.with_column(ds, "completion" if form == "prompt-completion" else "output", self.PLACEHOLDER)

    def example_from_text(self, text: str, context: str | None = None) -> dict[str, Any]:
        return {"instruction": text, "input": context or "", "output": self.PLACEHOLDER}

    def fields(self, example: dict[str, Any]) -> dict[str, str]:
        if data_format(list(example)) == "prompt-completion":
            request = str(example["prompt"])
            return {"instruction": request, "input": "", "request": request}
        instruction, extra = str(example["instruction"]).strip(), str(example.get("input") or "").strip()
        return {"instruction": instruction, "input": extra, "request": instruction + (f"\n\n{extra}" if extra else "")}

    def prompt_parts(self, example: dict[str, Any], fmt: PromptFormat | None = None) -> tuple[str, str, str]:
        form = data_format(list(example))
        fmt = fmt or self.prompt_format()
        if form in CHAT_FORMATS:
            return "", self._chat(example, fmt), ""
        if fmt.mode == "chat" or self.opts.prompt_template:
            return fmt.render(self.fields(example), self.shots)
        if form == "prompt-completion":  # the data's own prompt, as written
            return "", str(example["prompt"]), ""
        instruction, extra = str(example["instruction"]).strip(), str(example.get("input") or "").strip()
        if extra:
            head = ALPACA_HEAD.format(", paired with an input that provides further context")
            return head + f"### Instruction:\n{instruction}\n\n### Input:\n", extra, "\n\n### Response:\n"
        return ALPACA_HEAD.format("") + "### Instruction:\n", instruction, "\n\n### Response:\n"

    def target(self, example: dict[str, Any]) -> str:
        form = data_format(list(example))
        if form in CHAT_FORMATS:
            return conversations.turns_of(example, "conversation")[-1]["content"].strip()
        return str(example["completion" if form == "prompt-completion" else "output"] or "").strip()

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def reduce_logits(self, logits: Any, labels: torch.Tensor) -> torch.Tensor:
        """Per example: (summed negative log-likelihood of the response tokens, number of response tokens)."""
        if isinstance(logits, tuple):
            logits = logits[0]
        if self.decoder:  # token t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        return torch.stack([nll.sum(-1), (labels != -100).sum(-1).float()], dim=-1)

    def compute_metrics(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        nll, tokens = float(predictions[:, 0].sum()), float(predictions[:, 1].sum())
        return {"perplexity": math.exp(nll / tokens) if tokens else float("nan")}

    def example_predictions(self, predictions: Any, encoded: datasets.Dataset) -> Any:
        return {"stats": predictions, "samples": []}

    def add_samples(self, predictions: Any, generated: Any) -> Any:
        return {**predictions, "samples": self.texts(generated)}

    # ---- statistics for reports (tasks/_statistics.py): perplexity is exp(summed NLL / summed tokens) -------------
    @classmethod
    def example_statistics(cls, rows: list[dict[str, Any]], state: Mapping[str, Any]) -> np.ndarray:
        return np.asarray([[float(r["nll"]), float(r["tokens"])] for r in rows], dtype=float).reshape(-1, 2)

    @classmethod
    def metrics_from_totals(cls, totals: np.ndarray, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        mean = np.divide(
            totals[..., 0], totals[..., 1], out=np.full(totals.shape[:-1], np.nan), where=totals[..., 1] > 0
        )
        return {"perplexity": np.exp(mean)}

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        rows = []
        for i, example in enumerate(raw):
            head, body, tail = self.prompt_parts(example)
            nll, tokens = (float(x) for x in predictions["stats"][i])
            row = {
                "index": i,
                "prompt": head + body + tail,
                "reference": self.target(example),
                "perplexity": round(math.exp(nll / tokens), 4) if tokens else None,
                "nll": nll,
                "tokens": int(tokens),
            }
            if i < len(predictions["samples"]):
                row["generated"] = predictions["samples"][i]
            rows.append(row)
        return rows
