"""The run directory: refusing to clobber, atomic writes, and the final commit.

A run directory is complete when its `run.json` exists: it is written last, atomically (temporary file + rename),
after the final model has been moved in from a staging directory. `spec.json` (written first, and copied into
every checkpoint) says what the run is, so checkpoints can be evaluated and runs resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ftctl.errors import FtctlError

RUN_FILE = "run.json"
SPEC_FILE = "spec.json"
STAGING = ".final.tmp"


def is_ftctl_dir(path: Path) -> bool:
    return (path / RUN_FILE).is_file() or (path / SPEC_FILE).is_file()


def check_target(path: str, overwrite: bool, resume: bool) -> None:
    """Refuse an output directory we must not write to. Called before anything is written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FtctlError(f"output path {path} exists and is not a directory")
    non_empty = p.is_dir() and any(p.iterdir())
    if non_empty and not (overwrite or resume):
        raise FtctlError(
            f"output directory {path} already exists and is not empty; pass --overwrite to replace it, "
            "--resume to continue it, or choose another --output-dir"
        )
    if non_empty and overwrite and not is_ftctl_dir(p):
        raise FtctlError(
            f"--overwrite refused: {path} is not an ftctl run directory (no run.json or spec.json), "
            "so ftctl will not delete it; choose another --output-dir"
        )
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():  # a path component is a file: the directory could never be created
        raise FtctlError(
            f"cannot create output directory {path}: {ancestor} is a file, not a directory; choose another --output-dir"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise FtctlError(f"cannot write to {path}: {ancestor} is not writable; choose another --output-dir")
    try:  # permissions can say yes where the filesystem says no (/proc, /sys, read-only mounts): try it
        tempfile.TemporaryDirectory(dir=ancestor, prefix=".ftctl-probe-").cleanup()
    except OSError as exc:
        raise FtctlError(
            f"cannot create output directory {path}: {ancestor} does not take new directories ({exc.strerror}); "
            "choose another --output-dir"
        ) from None


def prepare(path: str, overwrite: bool) -> Path:
    p = Path(path)
    if overwrite and p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FtctlError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise FtctlError(f"{what} {path} is not a JSON object")
    return data


def staging_dir(run_dir: Path) -> Path:
    staging = run_dir / STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def commit(staging: Path, run_dir: Path) -> None:
    """Move the staged final files into the run directory, replacing any of the same name."""
    for entry in staging.iterdir():
        dest = run_dir / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        os.replace(entry, dest)
    staging.rmdir()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def complete_checkpoints(run_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(checkpoints whose files all read back, newest first; damaged ones with the reason). A checkpoint is complete
    when its trainer state parses and every safetensors file's header matches its length; the optimizer and RNG
    files the Trainer writes must be there and non-empty."""
    found = sorted(
        (p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    good, bad = [], []
    for checkpoint in found:
        problem = checkpoint_problem(checkpoint)
        if problem:
            bad.append((checkpoint, problem))
        else:
            good.append(checkpoint)
    return good, bad


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return f"trainer_state.json unreadable ({type(exc).__name__})"
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights and not (checkpoint / "pytorch_model.bin").is_file():
        return "no weights"
    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own error types for truncated files
            return f"{file.name} damaged ({str(exc).splitlines()[0][:80]})"
    for name in ("optimizer.pt", "scheduler.pt"):
        file = checkpoint / name
        if file.exists() and file.stat().st_size == 0:
            return f"{name} is empty"
    return None
