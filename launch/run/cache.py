"""Tokenized splits cached on disk, keyed by what produced them: re-runs, evaluations and the other processes of
a distributed run load the tokens instead of tokenizing again.

The key covers the raw split (datasets' content fingerprint, which follows every select/split), the tokenizer
(its full state, pad token included), the task's encoding settings and learned state (label maps), and the source
of the task's code, so a changed preprocessing never serves stale tokens. The cache lives in $FTCTL_CACHE
(default ~/.cache/ftctl); `--no-token-cache` turns it off for a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
from datasets.fingerprint import Hasher

from ftctl import __version__

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

    from tasks.base import Task


def cache_root() -> Path:
    return Path(os.environ.get("FTCTL_CACHE") or Path.home() / ".cache" / "ftctl") / "tokenized"


def _code_digest(task: Task) -> str:
    """The task's code: its classes' modules, and the helper modules beside them (tasks/_conversations.py renders
    and masks conversations, tasks/_prompts.py writes prompts): a change to any of them encodes anew."""
    digest = hashlib.sha256()
    files = {Path(inspect.getfile(cls)) for cls in type(task).__mro__ if cls.__module__.startswith("tasks.")}
    helpers = {p for f in files for p in f.parent.glob("_*.py")}
    for path in sorted(files | helpers):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(task: Task, raw: Any, tokenizer: PreTrainedTokenizerBase) -> str:
    cfg = task.cfg
    signature = {
        "ftctl": __version__,
        "code": _code_digest(task),
        "task": [task.name, task.preset_name, dataclasses.asdict(task.opts), task.state, task.shots],
        "data": [cfg.text_column, cfg.label_column, cfg.max_length],
        "raw": raw._fingerprint,
        "tokenizer": Hasher.hash(tokenizer),
    }
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:32]


def encode_cached(task: Task, raw: Any, tokenizer: PreTrainedTokenizerBase, enabled: bool = True) -> Any:
    """`task.encode(raw, tokenizer)`, from the cache when the same encoding was made before."""
    if not enabled:
        return task.encode(raw, tokenizer)
    path = cache_root() / cache_key(task, raw, tokenizer)
    if path.is_dir():
        try:
            return datasets.load_from_disk(str(path))
        except (OSError, ValueError, FileNotFoundError):
            shutil.rmtree(path, ignore_errors=True)  # unreadable entry: make it again
    encoded = task.encode(raw, tokenizer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        encoded.save_to_disk(str(tmp))
        os.replace(tmp, path)  # another process may have won the race; either copy is the same
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return encoded
    return datasets.load_from_disk(str(path))
