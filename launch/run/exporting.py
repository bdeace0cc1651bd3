"""A trained run as a standalone model: merged into its base (transformers), as an ONNX graph, or as a GGUF file.

- **merged**: a LoRA-family adapter folded into its base (`Method.merge`), saved as a plain transformers model in
  the base's dtype; a full-weight run is saved as it is. Loads with `AutoModelFor*.from_pretrained` alone.
- **onnx**: the merged model traced by PyTorch's own exporter (`torch.onnx.export(dynamo=True)`, onnxscript), with
  batch and sequence length dynamic, beside its `config.json` (the label names) and tokenizer: the layout Optimum's
  `ORTModelFor*` classes read. Optimum's exporter is the well-kept one for this, but optimum-onnx 0.1.0 (the newest
  release) needs transformers < 4.58 and fails to import on transformers 5.x (`get_parameter_dtype` is gone from
  `transformers.modeling_utils`); PyTorch's exporter follows the model's own forward, no graph is written by hand.
  Encoder heads only (classification, NER, STS-B, extractive QA): generation needs Optimum's with-past decoder graphs.
- **gguf**: decoders, converted from the merged model by llama.cpp's own `convert_hf_to_gguf.py`.

`OnnxModel` runs an exported graph under ONNX Runtime behind a module's forward, so `launch/run/parity.py` scores it
with the same Trainer, batches and post-processing as the trained run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers.utils import ModelOutput

from ftctl.errors import FtctlError
from ftctl.models import load_kwargs
from launch.run import parity, rundir
from launch.run.runs import Run, load_trained
from tasks.base import Task

if TYPE_CHECKING:  # annotations only
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FORMATS = ("merged", "onnx", "gguf")
ONNX_FILE = "model.onnx"
GGUF_FILE = "model.gguf"
ONNX_OUTPUTS = {  # the task's Auto class -> the outputs its ONNX graph returns
    "AutoModelForSequenceClassification": ("logits",),
    "AutoModelForTokenClassification": ("logits",),
    "AutoModelForQuestionAnswering": ("start_logits", "end_logits"),
}
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 18
CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_ENV = "FTCTL_GGUF_CONVERTER"  # llama.cpp's convert_hf_to_gguf.py, where it is not on PATH


def check_output(path: Path, overwrite: bool, marker: str, what: str) -> None:
    """An output directory that is new, empty, or (with --overwrite) `what` (an earlier output of the same command,
    which holds `marker`)."""
    if path.exists() and not path.is_dir():
        raise FtctlError(f"--output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FtctlError(f"--output {path} already exists and is not empty; pass --overwrite or another --output")
        if not (path / marker).is_file():
            raise FtctlError(f"--overwrite refused: {path} does not hold {what} (no {marker})")


def check_format(run: Run, fmt: str) -> None:
    """Refuse, before anything is loaded, a format the run's model cannot take."""
    task = run.task
    if fmt == "onnx" and task.fit.auto_model not in ONNX_OUTPUTS:
        raise FtctlError(
            f"--format onnx: task '{task.preset_name}' generates text, and generation graphs need Optimum's with-past "
            "decoder export, which does not support transformers 5.x; export it with --format merged (or gguf for "
            "decoders)"
        )
    if fmt == "gguf":
        if task.fit.auto_model != "AutoModelForCausalLM":
            raise FtctlError(
                f"--format gguf: llama.cpp runs decoder language models; task '{task.preset_name}' trains "
                f"{task.fit.auto_model} on {run.model_config.model_type}; export it with --format merged or onnx"
            )
        gguf_converter()  # refused now, not after the merge
    if fmt != "merged" and run.method.is_peft and not run.method.mergeable:
        raise FtctlError(
            f"--format {fmt}: method '{run.method.variant}' is not weights that fold into the model "
            f"({run.method.merge_refusal}); only the run directory itself (with PEFT) runs it"
        )


def standalone(run: Run, weights: Path, tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, list[str]]:
    """The fine-tuned model without PEFT: a LoRA-family adapter folded into its base, or a full-weight run's model."""
    kwargs = load_kwargs(run.cfg)
    try:
        if run.method.mergeable:
            return run.method.merge(run.task, str(weights), run.model_ref, tokenizer, kwargs)
        if run.method.is_peft:
            raise FtctlError(f"method '{run.method.variant}' has nothing to merge: {run.method.merge_refusal}")
        model = run.method.load_trained(run.task, str(weights), run.model_ref, tokenizer, kwargs)
        return model, []
    except (OSError, ValueError, RuntimeError) as exc:
        raise FtctlError(f"cannot merge {weights}: {str(exc).splitlines()[0]}") from None


def staged(output: Path, write: Callable[[Path], None]) -> None:
    """Write into a staging directory beside `output`, then move it into place: an interrupted export leaves no
    half-written copy, and an earlier output (--overwrite) is kept until the new one is complete."""
    staging = output.with_name(output.name + ".export.tmp")
    earlier = output.with_name(output.name + ".export.old")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write(staging)
    except BaseException:  # Ctrl-C, SIGTERM, a full disk, a failed converter
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        output.rename(earlier)
    staging.rename(output)
    shutil.rmtree(earlier, ignore_errors=True)


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, into: Path) -> None:
    model.save_pretrained(str(into))
    tokenizer.save_pretrained(str(into))


def load_merged(run: Run, path: Path) -> PreTrainedModel:
    """The merged model as plain transformers loads it: its Auto class and the task's load arguments, nothing else."""
    auto = getattr(transformers, run.task.fit.auto_model)
    return auto.from_pretrained(str(path), **run.task.load_args(run.model_config), **load_kwargs(run.cfg))


# ---- ONNX ------------------------------------------------------------------------------------------------------------
class _Traced(torch.nn.Module):
    """The model's forward on positional tensors, returning the task's output tensors: what the exporter traces."""

    def __init__(self, model: torch.nn.Module, inputs: tuple[str, ...], outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.model(**dict(zip(self.inputs, tensors, strict=True)))
        return tuple(result[name] for name in self.outputs)


def example_batch(task: Task, tokenizer: PreTrainedTokenizerBase, encoded: datasets.Dataset) -> dict[str, torch.Tensor]:
    """Two real examples of the split, collated as training does: the shapes and input names the graph is traced on
    (two, so that the batch dimension stays dynamic)."""
    from launch.run.trainer import batch_collator  # the trainer module imports TensorBoard; only the exporter needs it

    if len(encoded) < 2:
        raise FtctlError("--format onnx: the export is traced on two evaluation examples; the data has fewer")
    lengths = encoded["length"]
    shortest = min(range(len(lengths)), key=lengths.__getitem__)
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    # of different lengths, so that the traced batch is padded: an all-ones mask lets attention skip the mask, and
    # a graph traced that way would ignore the padding of every later batch
    rows = [encoded[shortest], encoded[longest if longest != shortest else (shortest + 1) % len(encoded)]]
    batch = batch_collator(task, tokenizer, False, False)(rows)
    return {k: v for k, v in batch.items() if k in ONNX_INPUTS}


def export_onnx(model: torch.nn.Module, task: Task, batch: dict[str, torch.Tensor], into: Path) -> None:
    """Trace `model` with PyTorch's exporter into `into/model.onnx` (batch and sequence dimensions dynamic)."""
    try:
        import onnxscript  # noqa: F401  the dynamo exporter's translator: a clear line where the extra is missing
    except ImportError:
        raise FtctlError("--format onnx needs onnx, onnxscript and onnxruntime: pip install 'ftctl[export]'") from None
    names = tuple(batch)
    outputs = ONNX_OUTPUTS[task.fit.auto_model]
    batch_dim, seq_dim = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    shapes = tuple({0: batch_dim, 1: seq_dim} for _ in names)
    model = model.float().eval()  # ONNX Runtime's CPU kernels: the graph in float32 whatever the training precision
    # the exporter's registry warns, once per operator, that torchvision (detection operators) is not installed
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad():
        program = torch.onnx.export(
            _Traced(model, names, outputs).eval(),
            tuple(batch[n] for n in names),
            dynamo=True,
            input_names=list(names),
            output_names=list(outputs),
            dynamic_shapes=(shapes,),  # the traced forward takes its inputs as one *tensors argument
            opset_version=OPSET,
            verbose=False,
        )
    assert program is not None
    program.save(str(into / ONNX_FILE))


class OnnxModel(torch.nn.Module):
    """An exported graph under ONNX Runtime (CPU), called as the transformers model it came from: the inputs it
    knows by name, its outputs by name in a ModelOutput on the inputs' device. The graph computes no loss: with
    labels in the batch the loss is NaN (parity compares predictions, never the loss)."""

    def __init__(self, path: Path, config: Any):
        super().__init__()
        import onnxruntime  # the export extra

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # a device and dtype for the Trainer

    def forward(self, **inputs: Any) -> ModelOutput:
        device = next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))
        feed = {n: inputs[n].detach().cpu().numpy() for n in self.input_names}
        values = self.session.run(self.output_names, feed)
        out = {n: torch.from_numpy(v).to(device) for n, v in zip(self.output_names, values, strict=True)}
        if any(k in inputs for k in ("labels", "start_positions")):
            out = {"loss": torch.tensor(math.nan, device=device), **out}
        return ModelOutput(**out)


# ---- GGUF ------------------------------------------------------------------------------------------------------------
def gguf_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py: $FTCTL_GGUF_CONVERTER, else on PATH; one line where there is none."""
    given = os.environ.get(CONVERTER_ENV)
    found = Path(given) if given else (Path(p) if (p := shutil.which(CONVERTER)) else None)
    if found is None or not found.is_file():
        where = f"{CONVERTER_ENV}={given} is not a file" if given else f"no {CONVERTER} on PATH"
        raise FtctlError(
            f"--format gguf uses llama.cpp's own converter and {where}; get llama.cpp "
            f"(https://github.com/ggml-org/llama.cpp) and set {CONVERTER_ENV}=/path/to/llama.cpp/{CONVERTER}"
        )
    return found


def export_gguf(merged: Path, into: Path, outtype: str) -> list[str]:
    """Convert a merged model directory with llama.cpp's converter; its own words where it refuses the model."""
    converter = gguf_converter()
    command = [sys.executable, str(converter), str(merged), "--outfile", str(into / GGUF_FILE), "--outtype", outtype]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise FtctlError(f"llama.cpp's converter refused the merged model: {lines[-1] if lines else done.returncode}")
    return command


def write_record(into: Path, name: str, info: dict[str, Any]) -> None:
    rundir.write_json(into / name, info)


# ---- the whole export ------------------------------------------------------------------------------------------------
def candidate_of(run: Run, fmt: str, into: Path, config: Any) -> torch.nn.Module:
    """The exported model, loaded the way its users load it: transformers for merged, ONNX Runtime for onnx."""
    if fmt == "onnx":
        return OnnxModel(into / ONNX_FILE, config)
    return load_merged(run, into)


def export_run(
    run: Run,
    weights: Path,
    tokenizer: PreTrainedTokenizerBase,
    fmt: str,
    output: Path,
    scoring: tuple[Any, datasets.Dataset, datasets.Dataset],
    max_disagreement: float,
    record: tuple[str, dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the run as `fmt` into `output` (staged: whole or not at all) with its record and parity.json; return
    both. `scoring` is (TrainingArguments, raw examples, encoded examples) to compare on."""
    args, raw, encoded = scoring
    model, notes = standalone(run, weights, tokenizer)
    config = model.config

    def write(into: Path) -> None:
        model_dir = into
        if fmt == "merged":
            save_merged(model, tokenizer, into)
        elif fmt == "onnx":
            export_onnx(model, run.task, example_batch(run.task, tokenizer, encoded), into)
            config.save_pretrained(str(into))
            tokenizer.save_pretrained(str(into))
        else:  # gguf: converted from a merged copy, which parity checks (the GGUF itself where llama.cpp runs here)
            model_dir = into / "merged"
            save_merged(model, tokenizer, model_dir)
            export_gguf(model_dir, into, "f32" if getattr(config, "dtype", None) in (None, torch.float32) else "auto")
        candidate = candidate_of(run, "onnx" if fmt == "onnx" else "merged", model_dir, config)
        reference = load_trained(
            run, weights, tokenizer, {**load_kwargs(run.cfg), **run.method.load_kwargs(run.context())}
        )
        checked, _, _ = parity.check(run, args, tokenizer, raw, encoded, reference, candidate)
        verdict = parity.verdict(checked, max_disagreement)
        name, info = record
        rundir.write_json(into / parity.PARITY_FILE, verdict)
        rundir.write_json(into / name, {**info, "format": fmt, "notes": notes, "parity": parity.summary(verdict)})

    staged(output, write)
    name = record[0]
    return rundir.read_json(output / name, "export record"), rundir.read_json(output / parity.PARITY_FILE, "parity")
