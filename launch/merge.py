"""Merge a run's adapter into its base model: `ftctl merge RUN_DIR --output DIR` (or `python -m launch.merge`).

LoRA-family results (lora, rslora, dora, adalora, ia3, qlora, qlora8) are folded into the weights they modify. The
output is a plain transformers model directory (config, safetensors weights, tokenizer, `merge.json`) that loads
with `AutoModelFor*.from_pretrained` alone and gives the fine-tuned model's outputs within float tolerance. A
quantized base (qlora, qlora8) is merged into its de-quantized weights, in full precision, and the command says so.
Soft prompts and bottleneck adapters are not weights that can be folded in, and full-weight methods already saved
a full model: those are refused before anything is loaded.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from launch.quiet import quiet

MERGE_FILE = "merge.json"


def build_parser() -> Any:
    from launch.options import Parser

    parser = Parser(
        prog="ftctl merge",
        description="Fold a run's LoRA-family adapter into its base model and save the result as a plain "
        "transformers model.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or a checkpoint-N directory inside one)")
    parser.add_argument("--output", metavar="DIR", required=True, help="directory to write the merged model to")
    parser.add_argument("--model", help="base model (default: the one in the adapter config)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it holds an earlier merge")
    return parser


def check_output(path: Path, overwrite: bool) -> None:
    from launch.errors import FtctlError

    if path.exists() and not path.is_dir():
        raise FtctlError(f"--output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FtctlError(f"--output {path} already exists and is not empty; pass --overwrite or another --output")
        if not (path / MERGE_FILE).is_file():
            raise FtctlError(f"--overwrite refused: {path} does not hold an earlier merge (no {MERGE_FILE})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_strict(argv)

    from launch import rundir
    from launch.config import resolve_values
    from launch.errors import FtctlError
    from launch.evaluate import check_weights, locate

    weights, spec = locate(opts["run_dir"])
    run = resolve_values(dict(spec["config"]))
    cfg, task, method = run.cfg, run.task, run.method
    task.state = spec["task_state"]
    if not method.mergeable:
        raise FtctlError(f"method '{method.variant}' has nothing to merge: {method.merge_refusal}")
    output = Path(opts["output"])
    check_output(output, opts["overwrite"])
    check_weights(weights, method.is_peft)

    from launch.models import load_config, load_kwargs, load_tokenizer, model_family, resolve_model

    adapter = rundir.read_json(weights / "adapter_config.json", "adapter config")
    base_ref = resolve_model(opts["model"] or adapter.get("base_model_name_or_path"))
    model_config = load_config(base_ref, cfg.trust_remote_code)
    family = model_family(model_config)
    task.check_model(model_config, family)

    from launch.quiet import quiet_transformers

    quiet_transformers()
    from launch.console import console

    tokenizer = load_tokenizer(str(weights), cfg.trust_remote_code)
    task.prepare_tokenizer(tokenizer, family)
    try:
        model, notes = method.merge(task, str(weights), base_ref, tokenizer, load_kwargs(cfg))
    except (OSError, ValueError, RuntimeError) as exc:
        raise FtctlError(f"cannot merge {weights}: {str(exc).splitlines()[0]}") from None

    info = {
        "run_dir": str(Path(opts["run_dir"]).resolve()),
        "method": method.variant,
        "base_model": base_ref,
        "auto_model": task.auto_model,
        "load_args": task.load_args(model_config),
        "notes": notes,
        "merged": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    staging = output.with_name(output.name + ".merge.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    rundir.write_json(staging / MERGE_FILE, info)
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)

    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(
        f"[green]merged[/] {method.variant} into {base_ref} -> {output}\n"
        f"load it: transformers.{task.auto_model}.from_pretrained({str(output)!r})"
    )
    return info


if __name__ == "__main__":
    from launch.errors import run_main

    sys.exit(run_main(main))
