"""Prefix tuning under gradient checkpointing.

PEFT hands the prefix to the model as a KV cache (`DynamicCache`, `EncoderDecoderCache`). Under gradient
checkpointing transformers drops any cache a checkpointed layer is given, because recomputing the layer in the
backward pass would append its keys to the cache a second time; the prefix silently disappears and the attention
mask no longer fits. During training the prefix is therefore handed over as a read-only cache (each layer sees
prefix + its own keys and values, nothing is stored), which a recomputed layer reads exactly as the first pass did,
and the layers are told they may keep it. Evaluation and generation get PEFT's ordinary, growing cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer


class PrefixLayer(DynamicLayer):
    """A cache layer holding the prefix that returns prefix + new states without storing the new ones."""

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class NeverUpdated(dict):
    """`EncoderDecoderCache.is_updated` that stays empty: cross-attention keys are recomputed on every call
    (training never reuses them), including in a checkpointed layer's recomputation."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def read_only(part: DynamicCache) -> None:
    """Swap a cache's layers for read-only ones holding the same prefix (and any layer added later as well)."""
    layers = []
    for layer in part.layers:
        frozen = PrefixLayer()
        if layer.is_initialized:
            frozen.lazy_initialization(layer.keys, layer.values)
            frozen.keys, frozen.values = layer.keys, layer.values
        layers.append(frozen)
    part.layers = layers
    part.layer_class_to_replicate = PrefixLayer


def read_only_prefix(cache: Any) -> Any:
    """The prefix cache made read-only, so that a checkpointed layer recomputed in the backward pass sees exactly
    what it saw in the forward pass."""
    if isinstance(cache, EncoderDecoderCache):
        read_only(cache.self_attention_cache)
        read_only(cache.cross_attention_cache)
        cache.is_updated = NeverUpdated()
    elif isinstance(cache, DynamicCache):
        read_only(cache)
    return cache


def _pass_cache_on(module: Any, args: Any) -> None:
    module.gradient_checkpointing = False


def keep_prefix_under_checkpointing(model: torch.nn.Module) -> None:
    """Let checkpointed layers keep the prefix cache, and give it to them read-only while training.

    The layers (`GradientCheckpointingLayer`) checkpoint themselves and are told they may keep the cache; a model
    that also drops the cache itself before calling them under checkpointing (GPT-2's `GPT2Model`) has its own,
    model-level flag turned off before each forward, which only decides that, since its layers do the
    checkpointing."""
    for module in model.get_base_model().modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True  # safe: the cache they get while training is never written
        elif hasattr(module, "gradient_checkpointing") and any(
            isinstance(m, GradientCheckpointingLayer) for m in module.modules()
        ):
            module.register_forward_pre_hook(_pass_cache_on)
    peft_get_prompt = model.get_prompt

    def get_prompt(*args: Any, **kwargs: Any) -> Any:
        prompt = peft_get_prompt(*args, **kwargs)
        return read_only_prefix(prompt) if model.training else prompt

    model.get_prompt = get_prompt
