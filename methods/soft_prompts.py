"""Soft prompts through PEFT: trained virtual tokens instead of trained weights. Four variants of one method:

- `prompt_tuning`: virtual token embeddings prepended to the input (Lester et al. 2021, arXiv:2104.08691);
  `--prompt-init-text` starts them from a text's token embeddings.
- `p_tuning`: the virtual tokens come from a small MLP prompt encoder (Liu et al. 2021, arXiv:2103.10385).
- `prefix_tuning`: trained keys and values prepended at every attention layer through the model's KV cache (Li &
  Liang 2021, arXiv:2101.00190).
- `p_tuning_v2`: the same deep prompts at every layer, produced through a trained projection (reparameterization)
  (Liu et al. 2022, arXiv:2110.07602).

The task head trains and is saved with the prompt. Prefix tuning hands the prefix to the model as a KV cache;
methods/_prefix_cache.py keeps it working under gradient checkpointing, which transformers' layers otherwise answer
by dropping the cache (and with it the prefix).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import transformers
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from ftctl.errors import FtctlError
from ftctl.models import position_limit
from ftctl.options import option
from ftctl.vocab import Family
from methods._matrix import Refusal
from methods._prefix_cache import keep_prefix_under_checkpointing
from methods.base import Context, PeftMethod, register_method

if TYPE_CHECKING:  # annotations only
    import torch
    from transformers import PretrainedConfig

    from tasks.base import Task

PROMPT, ENCODER, PREFIX = "prompt", "encoder", "prefix"
INPUT_PROMPTS = ("prompt_tuning", "p_tuning")
DEEP_PROMPTS = ("prefix_tuning", "p_tuning_v2")


@dataclass
class PromptOptions:
    num_virtual_tokens: int = option(20, "number of virtual tokens (the soft prompt's length)")
    prompt_init_text: str | None = option(
        None, "prompt_tuning: start the virtual tokens from this text's token embeddings (default: random)"
    )
    prompt_encoder_hidden_size: int | None = option(
        None, "p_tuning, p_tuning_v2: hidden size of the prompt encoder / prefix projection (default: the model's)"
    )

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise FtctlError(f"--num-virtual-tokens must be at least 1, got {self.num_virtual_tokens}")
        if self.prompt_init_text is not None and not self.prompt_init_text.strip():
            raise FtctlError("--prompt-init-text is empty; give a text or leave it out for a random start")
        if self.prompt_encoder_hidden_size is not None and self.prompt_encoder_hidden_size < 1:
            raise FtctlError(f"--prompt-encoder-hidden-size must be at least 1, got {self.prompt_encoder_hidden_size}")


def accepts_cache(model_config: PretrainedConfig) -> bool:
    """Whether the model's backbone takes a KV cache (`past_key_values`) that a prefix can be put into."""
    name = MODEL_MAPPING_NAMES.get(model_config.model_type)
    backbone = getattr(transformers, name, None) if isinstance(name, str) else None
    if backbone is None:
        return False
    return not {"past_key_values", "cache"}.isdisjoint(inspect.signature(backbone.forward).parameters)


REFUSALS = (
    Refusal(
        "decoder and encoder-decoder classification",
        lambda cell: cell.family != Family.ENCODER and cell.peft_task_type == "SEQ_CLS",
        "method '{method}' feeds input embeddings instead of input ids, and {family} classification models find the "
        "last real token (the one they classify) in the input ids; use prefix_tuning or p_tuning_v2 (decoders), or "
        "lora",
        variants=INPUT_PROMPTS,
    ),
    Refusal(
        "per-token tasks (token labels, answer spans)",
        lambda cell: cell.peft_task_type in ("TOKEN_CLS", "QUESTION_ANS"),
        "method '{method}' prepends virtual tokens to the input, which shifts every position that task '{task}' "
        "labels and reads predictions from; use prefix_tuning or p_tuning_v2 (the prefix sits in the cache), or lora",
        variants=INPUT_PROMPTS,
    ),
    Refusal(
        "encoder-decoder tasks with a head",
        lambda cell: cell.family == Family.ENCODER_DECODER and cell.has_head,
        "method '{method}': PEFT passes the prefix to the decoder of encoder-decoder models only, which their "
        "classification heads do not expect; use lora, ia3 or adapter on {model_type}",
        variants=DEEP_PROMPTS,
    ),
    Refusal(
        "models without a KV cache to extend (e.g. DistilBERT, DeBERTa)",
        lambda cell: cell.model_config is not None and not accepts_cache(cell.model_config),
        "method '{method}' puts the prefix into the model's key/value cache, and {model_type} models take no cache; "
        "use prompt_tuning, p_tuning or lora",
        static=False,
        variants=DEEP_PROMPTS,
    ),
)


@register_method
class SoftPrompt(PeftMethod):
    name = "prompt_tuning"
    description = "soft prompts through PEFT: prompt tuning, P-tuning, prefix tuning, P-tuning v2 (deep prompts)"
    trains = "virtual tokens (or per-layer prefixes) + head"
    Options = PromptOptions
    variants = {
        "prompt_tuning": {"kind": PROMPT, "description": "prompt tuning: learned virtual tokens before the input"},
        "p_tuning": {
            "kind": ENCODER,
            "defaults": {"*": {"load_best_model_at_end": False}},
            "description": "P-tuning: virtual tokens produced by a small prompt encoder",
        },
        "prefix_tuning": {
            "kind": PREFIX,
            "projection": False,
            "description": "prefix tuning: learned keys and values prepended in every layer's attention",
        },
        # the prefix projection (an MLP producing every layer's keys and values) does not learn at 1e-2 or 3e-3:
        # SST-2 with MiniLM stayed at the majority class (0.509 on dev); 1e-3 reached 0.789
        "p_tuning_v2": {
            "kind": PREFIX,
            "projection": True,
            "defaults": {"*": {"load_best_model_at_end": False, "learning_rate": 1e-3}},
            "description": "P-tuning v2 (deep prompts): per-layer prefixes produced through a projection",
        },
    }
    refusals = REFUSALS
    merge_refusal = "its virtual tokens are inputs, not weights; load the run with peft.PeftModel.from_pretrained"
    defaults = {"*": {"learning_rate": 1e-2, "epochs": 5.0}}

    @property
    def has_encoder(self) -> bool:
        return self.settings["kind"] == ENCODER or self.settings.get("projection", False)

    def plain_loss_reason(self) -> str | None:
        if self.variant in INPUT_PROMPTS:
            return f"{self.variant} prepends virtual tokens, which the model's own loss accounts for"
        return None

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        cfg, kind = ctx.cfg, self.settings["kind"]
        if self.has_encoder:
            # PEFT saves these with the encoder's output as the prompt and without the encoder
            # (https://github.com/huggingface/peft/issues/2256): fine for inference, but a checkpoint cannot be loaded
            # back into the model being trained, so neither the best checkpoint nor a resume can be restored
            if cfg.load_best_model_at_end and cfg.eval_strategy != "no":
                raise FtctlError(
                    f"{self.variant} checkpoints hold the encoded prompt, not the prompt encoder, so the best one "
                    "cannot be loaded back into training; pass --no-load-best-model-at-end (the final model is kept)"
                )
            if cfg.resume or cfg.resume_from:
                raise FtctlError(
                    f"{self.variant} checkpoints hold the encoded prompt, not the prompt encoder, so training cannot "
                    "resume from one; start again, or evaluate the checkpoint with ftctl evaluate"
                )
        if getattr(ctx.task, "packs", False):
            raise FtctlError(
                f"{self.variant} adds virtual tokens (or a prefix cache) to each input sequence, and --packing puts "
                "several examples in one sequence, so they would share one prompt; drop --packing"
            )
        limit, _ = position_limit(ctx.model_config)
        if limit is not None and self.opts.num_virtual_tokens >= limit:
            raise FtctlError(
                f"--num-virtual-tokens {self.opts.num_virtual_tokens} leaves no room for the input: this "
                f"{ctx.model_config.model_type} model reads {limit} positions; use far fewer (20 is the default)"
            )
        if self.opts.prompt_init_text is not None and kind != PROMPT:
            raise FtctlError(f"--prompt-init-text applies to prompt_tuning only, not {self.variant}")
        if self.opts.prompt_encoder_hidden_size is not None and not self.has_encoder:
            raise FtctlError(
                f"--prompt-encoder-hidden-size applies to p_tuning and p_tuning_v2 (which have an encoder), "
                f"not {self.variant}"
            )

    def peft_config(self, model: torch.nn.Module, task: Task) -> Any:
        # deferred: a heavy import (seconds), paid only by the runs that use it
        from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

        text = model.config.get_text_config()
        common = {
            "task_type": task.fit.peft_task_type,
            "num_virtual_tokens": self.opts.num_virtual_tokens,
            "modules_to_save": task.head_modules(model) or None,
            # read through the config's attribute map, which PEFT's own lookup misses (DistilBERT's `dim`, `n_heads`)
            "token_dim": text.hidden_size,
            "num_attention_heads": text.num_attention_heads,
        }
        kind = self.settings["kind"]
        if kind == PROMPT:
            init_text = self.opts.prompt_init_text
            init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": init_text} if init_text else {}
            return PromptTuningConfig(
                **common, **init, tokenizer_name_or_path=model.name_or_path if init_text else None
            )
        hidden = self.opts.prompt_encoder_hidden_size or text.hidden_size
        if kind == ENCODER:
            return PromptEncoderConfig(**common, encoder_hidden_size=hidden)
        return PrefixTuningConfig(**common, prefix_projection=self.settings["projection"], encoder_hidden_size=hidden)

    def apply(self, model: torch.nn.Module, task: Task, ctx: Context) -> torch.nn.Module:
        peft_model = self.wrap(model, self.peft_config(model, task), ctx)
        if self.settings["kind"] == PREFIX:
            keep_prefix_under_checkpointing(peft_model)
        return peft_model
