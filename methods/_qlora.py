"""QLoRA's quantization: what the `qlora` and `qlora8` variants of LoRA (methods/lora.py) add to it. A base model
whose linear layers bitsandbytes loads quantized (Dettmers et al. 2023, arXiv:2305.14314).

- `qlora`: 4-bit NormalFloat (NF4) weights with double quantization (the quantization constants quantized too),
  matrix products computed in bf16.
- `qlora8`: 8-bit LLM.int8() weights (Dettmers et al. 2022, arXiv:2208.07339).

Both are LoRA (same options, targets and defaults) plus load-time quantization and PEFT's k-bit preparation (norms
and the rest in fp32, inputs that require grad under gradient checkpointing). The task head (and any module the
checkpoint lacks) is never quantized: it trains in full precision and is saved with the adapter. Whether
bitsandbytes runs here is found by running a small quantized layer on the device, not from a version table.
`ftctl merge` folds the adapter into the de-quantized weights the adapter was trained against.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers import BitsAndBytesConfig
from transformers.quantizers.base import get_keys_to_not_convert

from ftctl import device
from ftctl.models import load_config, without_zero3
from methods._matrix import Refusal
from tasks.base import Task

if TYPE_CHECKING:  # annotations only
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")


@functools.cache
def bnb_problem(device: str, bits: int) -> str | None:
    """Why bitsandbytes cannot train `bits`-bit layers on `device` ("cpu" or "cuda"), or None: a 64x64 quantized
    layer is built, run forward and backward, and run again without gradients."""
    try:
        import bitsandbytes as bnb  # deferred: a heavy import (seconds), paid only by the runs that use it
    except Exception as exc:  # an import failure of a native library can be any exception type
        return f"bitsandbytes cannot be imported: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    try:
        if bits == 4:
            layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        layer = unpacked(layer.to(device))
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).float().sum().backward()
        layer.eval()
        with torch.no_grad():
            layer(x)
    except Exception as exc:  # whatever the native backend raises: report it, do not guess
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else 'no message'}"
    return None


def unpacked(model: torch.nn.Module) -> Any:
    """Keep 4-bit weights in bitsandbytes' portable layout on CPU. bitsandbytes 0.50 repacks them for its AVX512-BF16
    kernel on the first forward without gradients (an evaluation), and the next training forward then fails (an
    in-place add on a view of a leaf); the packed kernel also rounds differently, so a reloaded model would not
    reproduce the outputs seen in training."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def compute_dtype() -> Any:
    """QLoRA computes in bf16, or in fp16 on GPUs without bf16 (as `--precision auto` trains there)."""
    return torch.float16 if device.cuda_bf16() is False else torch.bfloat16


def kept_full_precision(task: Task, model_config: PretrainedConfig) -> list[str]:
    """Modules not to quantize: the task head and transformers' own choice (output embeddings, tied weights, the
    last module), found on a weightless (meta-device) copy of the model."""

    with torch.device("meta"), without_zero3():  # under ZeRO-3 too: it only names modules
        skeleton = getattr(transformers, task.fit.auto_model).from_config(model_config)
    modules = dict(skeleton.named_modules())
    keep = {*task.head_modules(skeleton), *get_keys_to_not_convert(skeleton)}
    return sorted(name for name in keep if name in modules)  # transformers may name a parameter (`classifier.bias`)


def quantization_kwargs(
    bits: int, task: Task, model_config: PretrainedConfig, deepspeed_stage: int | None = None
) -> dict:

    skip = kept_full_precision(task, model_config)
    if bits == 4:
        storage = {"bnb_4bit_quant_storage": compute_dtype()} if deepspeed_stage == 3 else {}  # ZeRO-3 shards it
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
            llm_int8_skip_modules=skip,
            **storage,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    kwargs: dict[str, Any] = {"quantization_config": config}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # each process quantizes onto its GPU
    return kwargs


def dequantized_copy(quantized: Any, full: Any) -> list[str]:
    """Overwrite `full`'s weights with the de-quantized weights of `quantized` (the same model loaded quantized):
    the values the adapter was trained against. Returns the layers replaced."""

    # deferred: this transformers module imports bitsandbytes, whose native libraries load (and print) at import
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    replaced = []
    for name, module in quantized.named_modules():
        if type(module).__name__ not in QUANTIZED_LAYERS:
            continue
        weight = dequantize_bnb_weight(module.weight, getattr(module, "state", None)).float()
        target = full.get_submodule(name)
        if type(target).__name__ == "Conv1D":  # GPT-2 stores (in, out); bitsandbytes quantized it as (out, in)
            weight = weight.T
        with torch.no_grad():
            target.weight.copy_(weight.to(target.weight.dtype))
        replaced.append(name)
    return replaced


def quantization_refusals() -> tuple[Refusal, ...]:
    """The combinations the quantized LoRA variants cannot run (their rows of the compatibility matrix)."""

    def bnb_refusal(bits: int, variant: str) -> Refusal:
        return Refusal(
            f"bitsandbytes cannot run {bits}-bit layers on the device",
            lambda cell: bnb_problem(cell.launch.device, bits) or False,
            "method '{method}' needs bitsandbytes " + str(bits) + "-bit layers, which do not run on this machine "
            "({detail}); use lora, or a machine where bitsandbytes works (pip install -U bitsandbytes)",
            static=False,
            variants=(variant,),
        )

    return (
        bnb_refusal(4, "qlora"),
        bnb_refusal(8, "qlora8"),
        Refusal(
            "DeepSpeed ZeRO-3 (8-bit)",
            lambda cell: cell.launch.deepspeed_stage == 3,
            "method '{method}': ZeRO-3 cannot partition bitsandbytes 8-bit weights; use qlora (4-bit) or ZeRO-2",
            static=False,
            variants=("qlora8",),
        ),
    )


def quantization_record(model: torch.nn.Module, bits: int) -> dict[str, Any]:
    """What run.json says of the quantization."""
    config = model.config.quantization_config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keys = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant")
    facts = {k: config[k] for k in keys if k in config}
    facts["bnb_4bit_compute_dtype"] = str(config.get("bnb_4bit_compute_dtype", "")).replace("torch.", "")
    return {"quantization": {"bits": bits, **facts, "full_precision_modules": config["llm_int8_skip_modules"]}}


def merge_dequantized(
    task: Task, path: str, base: str, tokenizer: PreTrainedTokenizerBase, load_kwargs: dict[str, Any], bits: int
) -> tuple[Any, list[str]]:
    """The base loaded quantized as in training, de-quantized into a full-precision copy, then the adapter merged
    into that: the merged model reproduces the fine-tuned quantized model, not base + adapter."""
    from peft import PeftModel  # deferred: a heavy import (seconds), paid only by the runs that use it

    model_config = load_config(base, bool(load_kwargs.get("trust_remote_code")))
    quantized = task.build_model(base, tokenizer, {**load_kwargs, **quantization_kwargs(bits, task, model_config)})
    full = task.build_model(base, tokenizer, load_kwargs)
    replaced = dequantized_copy(quantized, full)
    del quantized
    merged = PeftModel.from_pretrained(full, path).merge_and_unload()
    kind = "4-bit NF4 (double quantization)" if bits == 4 else "8-bit LLM.int8()"
    return merged, [
        f"merged into the de-quantized {kind} weights the adapter was trained on ({len(replaced)} layers), in full "
        "precision: the merged model reproduces the fine-tuned quantized model, not the original base weights"
    ]
