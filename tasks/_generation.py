"""What every text-to-text task shares: prompts (tasks/_prompts.py), tokenization with the loss on the target only,
batching, the model class per family, generation settings, and decoding generated ids back to text.

Encoder-decoders (T5, BART) read the prompt in the encoder and learn the target as `labels`. Decoders (GPT-2,
Llama, Phi, ...) read `prompt + target + END` with the prompt's labels set to -100, so only the target and the token
that ends it are learned: the end of the assistant turn with a chat template (Llama-3's `<|eot_id|>`, ...), EOS
otherwise; generation stops on either. BOS is there exactly once: from the chat template's text when it writes one
(Llama-3, Gemma-2), else added the way the tokenizer adds it. Labels are built from the tokens, never by masking the
pad id, so a decoder whose pad token is its EOS still learns to stop. Padding is masked out of the loss (-100) and
of attention. Decoders are given a pad token that is not their EOS where the tokenizer has one to spare (its
unknown token), else their EOS.

At evaluation the engine generates from the prompt alone: the collator adds `generation_input_ids` (the prompt,
left-padded) for decoders; encoder-decoders generate from the right-padded encoder input. Labels never reach the
model's input there. Generation settings: `--num-beams`, `--max-new-tokens`, `--no-repeat-ngram-size`.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedTokenizerBase

from ftctl import device
from ftctl.errors import FtctlError
from ftctl.options import option
from ftctl.vocab import LOSS_KERNELS, Family, TaskKind
from tasks._collators import GenerationCollator, PackingCollator
from tasks._prompts import CHAT_CHOICES, PromptFormat, PromptSpec, Shot, check_template, read_template
from tasks.base import ModelFit, RowView, Task, fresh_modules

T5_TYPES = ("t5", "mt5", "umt5", "longt5")  # trained with task prefixes ("summarize: ", "translate ...: ")


@dataclass
class GenerationOptions:
    num_beams: int = option(1, "beams for generation at evaluation (1: greedy)")
    max_new_tokens: int | None = option(None, "most tokens generated per example at evaluation (default: per task)")
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size when generating (0: off)")
    max_target_length: int | None = option(None, "truncate targets to this many tokens (default: per task)")
    packing: bool = option(
        False,
        "decoders: train on padding-free packed batches (each micro-batch one row, positions restarting per example, "
        "attention kept within each example)",
    )
    prompt_template: str | None = option(
        None,
        "the prompt, with the task's named fields ({text}, {question}, {context}, {source_lang}, ...; {instruction} "
        "is the task's instruction): the user turn with a chat template, else the whole prompt; a string or a file",
    )
    system_prompt: str | None = option(None, "a system prompt: the system turn with a chat template, else a first line")
    chat_template: str = option(
        "auto",
        "decoders: render prompts with the tokenizer's chat template (auto: when it has one)",
        choices=CHAT_CHOICES,
    )
    loss_kernel: str = option(
        "auto",
        "decoders: the loss without full-vocabulary logits for every position (chunked: logits at labelled "
        "positions only, a chunk at a time; fused: Liger Kernel on CUDA; plain: the model's own; auto: fused where "
        "it runs, else chunked)",
        choices=LOSS_KERNELS,
    )

    def validate(self) -> None:
        for name in ("num_beams", "max_new_tokens", "max_target_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FtctlError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.no_repeat_ngram_size < 0:
            raise FtctlError(f"--no-repeat-ngram-size must not be negative, got {self.no_repeat_ngram_size}")


def varlen_attention() -> str | None:
    """The attention that runs packed sequences without padding or a mask: FlashAttention-2's variable-length
    kernels (transformers' `flash_attention_2`, given the sequence boundaries from the packed `position_ids`), on a
    CUDA GPU with flash-attn installed. None elsewhere: then transformers' default attention runs the packed row
    with a block-diagonal mask (exact, and what the CPU tests compare with padded batches)."""
    if device.cuda_bf16() is None or importlib.util.find_spec("flash_attn") is None:
        return None
    return "flash_attention_2"


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(ids the tokenizer puts before, after) a single text: [BOS] for Llama, [] and [</s>] for T5, none for GPT-2."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for at in range(len(full) - len(plain) + 1):
        if full[at : at + len(plain)] == plain:
            return full[:at], full[at + len(plain) :]
    return [], []


class GenerationTask(Task):
    """Base of the tasks whose output is text. Subclasses say how an example becomes a prompt and a target
    (`prompt_parts`, `target`), what the references are, and how texts are scored (`score_texts`)."""

    kind = TaskKind.GENERATION
    has_head = False
    generates = True
    families = (Family.ENCODER_DECODER, Family.DECODER)
    Options = GenerationOptions
    extra_columns = ("references",)
    peft_task_type = "SEQ_2_SEQ_LM"
    auto_model = "AutoModelForSeq2SeqLM"
    pipeline_tag = "text2text-generation"
    decoder_pipeline_tag = "text-generation"
    max_new_tokens = 64  # generation length when neither the option nor the preset says
    max_target_length = 128
    prompt_spec: PromptSpec

    def __init__(self, cfg: Any, opts: Any, preset_name: str):
        super().__init__(cfg, opts, preset_name)
        if getattr(opts, "prompt_template", None):  # a field the task does not have: refused before anything runs
            check_template(read_template(opts.prompt_template) or "", self.spec())

    # ---- what subclasses define -------------------------------------------------------------------------------
    def fields(self, example: dict[str, Any]) -> dict[str, str]:
        """The example's named prompt fields (`PromptSpec.fields`)."""
        raise NotImplementedError

    def spec(self) -> PromptSpec:
        return self.prompt_spec

    def instruction(self) -> str | None:
        """The preset's own instruction, if it has one (else the task's default)."""
        return self.preset.facts.get("instruction")

    def target(self, example: dict[str, Any]) -> str:
        raise NotImplementedError

    def references(self, example: dict[str, Any]) -> list[str]:
        return [self.target(example)]

    def score_texts(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        raise NotImplementedError

    # ---- inference (ftctl predict, ftctl generate) ---------------------------------------------------------------
    gold_fields = ("reference", "references", "perplexity", "nll", "tokens", "exact_match", "f1")
    row_view = RowView(None, ("prompt",), "reference")
    PLACEHOLDER = "…"  # an answer for unlabelled inputs: never read (the model generates from the prompt alone)

    # ---- settings -----------------------------------------------------------------------------------------------
    def setting(self, name: str) -> int:
        """An option's value, else the preset's, else the task's."""
        value = getattr(self.opts, name, None)
        return int(value if value is not None else self.preset.facts.get(name, getattr(self, name)))

    @property
    def decoder(self) -> bool:
        return self.fit.family == Family.DECODER

    @property
    def t5_style(self) -> bool:
        return self.fit.family == Family.ENCODER_DECODER and self.fit.model_type in T5_TYPES

    def prompt_format(self, tokenizer: PreTrainedTokenizerBase | None = None) -> PromptFormat:
        """The prompts for `tokenizer` (default: the one the task is bound to)."""
        return PromptFormat(
            self.spec(),
            tokenizer or self.prepared_tokenizer,
            decoder=self.decoder,
            t5_style=self.t5_style,
            chat=self.opts.chat_template,
            template=read_template(self.opts.prompt_template),
            system=self.opts.system_prompt,
            instruction=self.instruction(),
        )

    def prompt_parts(self, example: dict[str, Any], fmt: PromptFormat | None = None) -> tuple[str, str, str]:
        """(head, body, tail) of the prompt, as the model reads it; only the body is shortened when it is too long."""
        return (fmt or self.prompt_format()).render(self.fields(example), self.shots)

    def few_shot(self, train: datasets.Dataset, k: int, seed: int) -> tuple[Shot, ...]:
        """K solved training examples for the prompt (in-context learning): a seeded choice, so the same run always
        shows the same examples in the same order."""
        picked = random.Random(seed).sample(range(len(train)), k)
        return tuple(self._shot(train[i]) for i in picked)

    def _shot(self, example: dict[str, Any]) -> Shot:
        return Shot(self.fields(example), self.target(example))

    def stop_ids(self, fmt: PromptFormat | None = None) -> list[int]:
        """The tokens that end an answer: the assistant turn's end (chat templates) and EOS."""
        fmt = fmt or self.prompt_format()
        ends = [fmt.end_of_turn(), fmt.tokenizer.eos_token_id]
        return list(dict.fromkeys(int(t) for t in ends if t is not None))

    def prompt_record(self, example: dict[str, Any]) -> dict[str, Any]:
        """What run.json and the model card keep of the prompt: its format and the first example as rendered."""
        fmt = self.prompt_format()
        head, body, tail = self.prompt_parts(example, fmt)
        end = self.stop_ids(fmt)[0]
        prompt = head + body + tail
        answer = fmt.answer(prompt, self.target(example))
        return {
            **fmt.describe(),
            "first_example": {"prompt": prompt, "target": answer},
            "end_of_answer": self.prepared_tokenizer.convert_ids_to_tokens(end) if self.decoder else "EOS",
            "few_shot": len(self.shots),
        }

    @property
    def prepared_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise RuntimeError(f"task '{self.preset_name}' is not bound to its tokenizer yet (bind(tokenizer=...))")
        return self.tokenizer

    # ---- model ------------------------------------------------------------------------------------------------
    def check_model(self, model_config: PretrainedConfig, family: Family) -> ModelFit:
        fit = super().check_model(model_config, family)
        if getattr(self.opts, "packing", False) and family != Family.DECODER:
            raise FtctlError(
                f"--packing concatenates examples in one decoder sequence; {family} models like "
                f"'{model_config.model_type}' read inputs and targets apart, so drop --packing"
            )
        if family != Family.DECODER:
            return fit
        # causal-LM losses sum over response tokens and divide by the count the Trainer passes: exact token-level
        # normalisation across micro-batches and processes
        return ModelFit(family, fit.model_type, "AutoModelForCausalLM", "CAUSAL_LM", self.decoder_pipeline_tag, True)

    @property
    def packs(self) -> bool:
        """Training batches are packed (see PackingCollator)."""
        return bool(getattr(self.opts, "packing", False)) and self.decoder

    def prepare_tokenizer(self, tokenizer: PreTrainedTokenizerBase, family: Family) -> None:
        if tokenizer.pad_token is None:
            spare = tokenizer.unk_token if tokenizer.unk_token not in (None, tokenizer.eos_token) else None
            if spare is None and tokenizer.eos_token is None:
                raise FtctlError("the tokenizer has neither a pad nor an end-of-sequence token to pad with")
            tokenizer.pad_token = spare or tokenizer.eos_token
        if family == "decoder" and tokenizer.eos_token is None:
            raise FtctlError("this decoder's tokenizer has no end-of-sequence token, so it could not learn to stop")

    def build_model(self, ref: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any]) -> torch.nn.Module:
        auto = AutoModelForCausalLM if self.decoder else AutoModelForSeq2SeqLM
        attention = varlen_attention() if self.packs else None
        if attention and "attn_implementation" not in load_kwargs:
            load_kwargs = {**load_kwargs, "attn_implementation": attention}
        model = self.load_pretrained(auto, ref, **load_kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """No head: the language-model output layer is pretrained (and often tied to the embeddings). Only modules
        the checkpoint lacked must train."""
        return fresh_modules(model)

    def load_args(self, model_config: PretrainedConfig) -> dict[str, Any]:
        return {}

    # ---- data ---------------------------------------------------------------------------------------------------
    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
        max_length = min(self.cfg.max_length, tokenizer.model_max_length or self.cfg.max_length)
        decoder = self.decoder
        max_target = self.setting("max_target_length")
        if decoder:  # prompt and target share the decoder's length
            max_target = min(max_target, max_length // 2)
        fmt = self.prompt_format(tokenizer)
        before, after = special_ids(tokenizer)
        end = self.stop_ids(fmt)[0]

        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

        def encode_batch(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": [], "references": [], "length": []}
            if decoder:
                out["prompt_ids"] = []
            examples = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            for example in examples:
                head, body, tail = self.prompt_parts(example, fmt)
                text = head + body + tail
                if decoder:
                    target = ids(fmt.answer(text, self.target(example)))[:max_target]
                    prompt = _decoder_prompt(tokenizer, before, ids, (head, body, tail), max_length - len(target) - 1)
                    out["prompt_ids"].append(prompt)
                    out["input_ids"].append(prompt + target + [end])
                    out["labels"].append([-100] * len(prompt) + target + [end])
                else:
                    target = ids(self.target(example))[:max_target]
                    source = _encoder_input(tokenizer, ids, (head, body, tail), max_length, (before, after))
                    label_ids = before + target + after if after else before + target + [tokenizer.eos_token_id]
                    out["input_ids"].append(source)
                    out["labels"].append(label_ids)
                out["references"].append(self.references(example))
                out["length"].append(len(out["input_ids"][-1]))
            return out

        return ds.map(encode_batch, batched=True, remove_columns=ds.column_names, desc="tokenizing")

    def collator(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> Any:
        return GenerationCollator(tokenizer.pad_token_id, pad_to_multiple_of)

    def train_collator(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> Any:
        if self.packs:
            return PackingCollator()
        return self.collator(tokenizer, pad_to_multiple_of)

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def generation_kwargs(self) -> dict[str, Any]:
        tokenizer = self.prepared_tokenizer
        stops = self.stop_ids()
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.setting("max_new_tokens"),
            "num_beams": self.opts.num_beams,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": stops if len(stops) > 1 else stops[0],
        }
        if self.opts.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.opts.no_repeat_ngram_size
        return kwargs

    def texts(self, generated: Any) -> list[str]:
        """Generated ids (padded with -100 or the pad id) as text, each cut where the answer ended (end of turn or
        end of sequence)."""
        tokenizer = self.prepared_tokenizer
        stops, pad = set(self.stop_ids()), tokenizer.pad_token_id
        out = []
        for row in generated:
            ids = []
            for token in (int(t) for t in row):
                if token in stops:
                    break
                if token >= 0 and token != pad:
                    ids.append(token)
            out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
        return out

    def compute_metrics(self, predictions: Any, labels: Any, encoded: datasets.Dataset) -> dict[str, Any]:
        return self.score_texts(self.texts(predictions), [list(r) for r in encoded["references"]])

    def example_predictions(self, predictions: Any, encoded: datasets.Dataset) -> list[str]:
        return self.texts(predictions)

    def prediction_rows(self, raw: datasets.Dataset, predictions: Any) -> list[dict[str, Any]]:
        rows = []
        for i, example in enumerate(raw):
            head, body, tail = self.prompt_parts(example)
            references = self.references(example)
            row = {"index": i, "prompt": head + body + tail, "reference": references[0], "prediction": predictions[i]}
            if len(references) > 1:
                row["references"] = references
            rows.append(row)
        return rows


def _decoder_prompt(
    tokenizer: PreTrainedTokenizerBase, before: list[int], ids: Any, parts: tuple[str, str, str], room: int
) -> list[int]:
    """The prompt's ids: the rendered text tokenized whole, with BOS exactly once (the template's, else the
    tokenizer's own); when it does not fit in `room`, the body alone is shortened."""
    head, body, tail = parts
    bos = [] if tokenizer.bos_token and (head + body + tail).startswith(tokenizer.bos_token) else before
    prompt = bos + ids(head + body + tail)
    if len(prompt) <= room:
        return prompt
    head_ids, tail_ids = bos + ids(head), ids(tail)
    if room - len(head_ids) - len(tail_ids) < 1:
        raise FtctlError(
            f"the prompt around the input takes {len(head_ids) + len(tail_ids)} tokens (template, instruction, system "
            f"prompt and any few-shot examples), which leaves no room for the input within {room} tokens (--max-length "
            "less the target); raise --max-length, shorten the prompt, lower --max-target-length or use fewer "
            "examples"
        )
    return head_ids + ids(body)[: room - len(head_ids) - len(tail_ids)] + tail_ids


def _encoder_input(
    tokenizer: PreTrainedTokenizerBase, ids: Any, parts: tuple[str, str, str], max_length: int, special: tuple
) -> list[int]:
    """An encoder's input ids (with the tokenizer's special tokens); the body alone is shortened when too long."""
    head, body, tail = parts
    source = tokenizer(head + body + tail)["input_ids"]
    if len(source) <= max_length:
        return source
    before, after = special
    head_ids, tail_ids = ids(head), ids(tail)
    keep = max(0, max_length - len(before) - len(after) - len(head_ids) - len(tail_ids))
    return (before + head_ids + ids(body)[:keep] + tail_ids + after)[:max_length]


def require_columns(splits: dict[str, datasets.Dataset], columns: list[str], flags: dict[str, str]) -> None:
    """Every split has the columns, else one line naming what is there and the flag that chooses it."""
    for split, ds in splits.items():
        if len(ds) == 0:
            raise FtctlError(f"{split} data has no examples")
        for column in columns:
            if column not in ds.column_names:
                flag = flags.get(column, "")
                raise FtctlError(
                    f"{split} data has no column '{column}'; columns found: {', '.join(ds.column_names)}"
                    + (f" (choose with {flag})" if flag else "")
                )
