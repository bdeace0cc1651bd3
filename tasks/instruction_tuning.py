"""Instruction tuning (supervised fine-tuning on prompt/response pairs): Alpaca and any instruction data.

The loss covers the response tokens (and the end-of-sequence token after them) only; the prompt is masked. Scored
by perplexity on held-out responses: exp(total negative log-likelihood / response tokens), token-weighted over the
whole split (not a mean of per-batch losses). The final evaluation also generates responses for the first
`--num-samples` prompts, written to predictions.jsonl beside each example's perplexity.

Data:
- Alpaca JSON/JSONL (`instruction`, optional `input`, `output`), rendered with the Stanford Alpaca prompt;
- prompt/completion JSONL (`prompt`, `completion`);
- chat JSONL (`messages`: a list of `{"role", "content"}` ending with the assistant's reply, which is the target),
  rendered with the tokenizer's chat template when it has one, else with a plain `### User:` / `### Assistant:`
  layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from ftctl.errors import FtctlError
from ftctl.options import option
from tasks._generation import GenerationOptions, GenerationTask
from tasks._prompts import PromptFormat, PromptSpec
from tasks.base import Preset, register_task

ALPACA_HEAD = (
    "Below is an instruction that describes a task{}. Write a response that appropriately completes the request.\n\n"
)
FORMATS = {
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "chat": ("messages",),
}


@dataclass
class InstructionOptions(GenerationOptions):
    num_samples: int = option(4, "generate responses for this many validation prompts at the final evaluation")

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
            "generic: Alpaca JSON (instruction/input/output), prompt/completion or chat (messages) JSONL"
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
                    "instruction/input/output, prompt/completion or messages)"
                )
            for i, example in enumerate(ds):
                if not self.target(example):
                    raise FtctlError(f"{split} data: example {i + 1} has an empty response")
        return {}

    def _chat(self, messages: list[dict[str, str]], fmt: PromptFormat | None = None) -> tuple[str, str]:
        """Chat data: the conversation before the last reply, rendered by the chat template (or a plain layout)."""
        history, reply = messages[:-1], _reply(messages)
        fmt = fmt or self.prompt_format()
        if fmt.mode == "chat":
            text = fmt.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            return text, reply
        turns = "".join(f"### {m.get('role', 'user').capitalize()}:\n{m.get('content', '')}\n\n" for m in history)
        return turns + "### Assistant:\n", reply

    def unlabelled(self, ds: datasets.Dataset) -> datasets.Dataset:
        form = data_format(ds.column_names) or ("prompt-completion" if "prompt" in ds.column_names else None)
        if form == "chat":
            reply = {"role": "assistant", "content": self.PLACEHOLDER}

            def answered(row: dict[str, Any]) -> dict[str, Any]:
                messages = list(row["messages"] or [])
                if messages and messages[-1].get("role") == "assistant":
                    return {"messages": messages}
                return {"messages": [*messages, reply]}

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
        if form == "chat":
            return "", self._chat(example["messages"], fmt)[0], ""
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
        if form == "chat":
            return _reply(example["messages"]).strip()
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


def _reply(messages: list[dict[str, str]]) -> str:
    """A chat example's response to learn: its last message, the assistant's."""
    if not messages or messages[-1].get("role") != "assistant":
        raise FtctlError("chat examples must end with the assistant's message (the response to learn)")
    return str(messages[-1].get("content") or "")
