"""Batching of the text-to-text tasks (tasks/_generation.py): padded batches with the prompt alone for `generate`,
and padding-free packed rows for decoder training. A helper module, not a task (no registration)."""

from __future__ import annotations

from typing import Any

import torch


class GenerationCollator:
    """Pads a batch: inputs right (attention mask 0), labels with -100, and for decoders the prompt alone, left,
    as `generation_input_ids` / `generation_attention_mask` for `generate`."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def _width(self, rows: list[list[int]]) -> int:
        width = max(len(r) for r in rows)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        return width

    def _pad(self, rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = self._width(rows)
        padded = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]
        return torch.tensor(padded, dtype=torch.long)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        inputs = [list(f["input_ids"]) for f in features]
        batch = {
            "input_ids": self._pad(inputs, self.pad_id),
            "attention_mask": self._pad([[1] * len(r) for r in inputs], 0),
        }
        if "labels" in features[0]:
            batch["labels"] = self._pad([list(f["labels"]) for f in features], -100)
        if "prompt_ids" in features[0]:
            prompts = [list(f["prompt_ids"]) for f in features]
            batch["generation_input_ids"] = self._pad(prompts, self.pad_id, left=True)
            batch["generation_attention_mask"] = self._pad([[1] * len(r) for r in prompts], 0, left=True)
        return batch


class PackingCollator:
    """Padding-free training batches for decoders: the micro-batch's examples concatenated into one row.

    `position_ids` restart at 0 for every example and there is no attention mask, from which transformers builds
    attention that stays inside each example (a block-diagonal causal mask for SDPA and eager attention, sequence
    boundaries for FlashAttention); the first label of every example is -100, so no example learns to predict the
    next one's first token. The loss therefore equals the padded batch's, without computing a single pad token.
    `use_cache=False`: transformers only looks for packed sequences when no KV cache is passed, and a model left to
    itself makes one (it would then attend across examples without a word).
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for f in features:
            ids = list(f["input_ids"])
            input_ids += ids
            labels += [-100, *list(f["labels"])[1:]]
            positions += range(len(ids))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "use_cache": False,
        }
