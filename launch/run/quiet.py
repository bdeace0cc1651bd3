"""Keep library chatter (load reports, hub retries, kernel probes, per-step prints) out of the user's terminal.

ftctl prints its own summary and progress; set FTCTL_VERBOSE=1 to see the libraries' own logs again.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Any


def quiet() -> None:
    if os.environ.get("FTCTL_VERBOSE"):
        return
    for key, value in {
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }.items():
        os.environ.setdefault(key, value)
    if not os.path.exists("/dev/nvidiactl"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed warns when it has to guess
    for name in ("bitsandbytes", "huggingface_hub", "datasets", "accelerate", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft|accelerate)\.")


def quiet_transformers() -> None:
    """Called once transformers is imported: no weight-loading progress bars."""
    if os.environ.get("FTCTL_VERBOSE"):
        return
    from transformers.utils import logging as hf_logging  # deferred: quiet() runs before transformers is imported

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets  # deferred: as transformers above

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


class QuietProfiler:
    """The profiler's own notices kept out of the training log: kineto's `USDT: ... profiler_start/stop` lines and
    c10's warning about blocks allocated before the window, both written by C++ to file descriptor 2. While the
    window is open, descriptor 2 goes to a temporary file; when it closes, every other line written meanwhile is
    written back, in order. With FTCTL_VERBOSE set, nothing is held back."""

    NOISE = re.compile(r"USDT:.*profiler_(start|stop)|CPUAllocator\.cpp.*Memory block of unknown size")

    def __init__(self) -> None:
        self.saved: int | None = None
        self.file: Any = None

    def open(self) -> None:
        if os.environ.get("FTCTL_VERBOSE"):
            return
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)

    def close(self) -> None:
        if self.saved is None:
            return
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.saved = None
        self.file.seek(0)
        lines = self.file.read().decode("utf-8", errors="replace").splitlines(keepends=True)
        self.file.close()
        kept = "".join(line for line in lines if not self.NOISE.search(line))
        if kept:
            sys.stderr.write(kept)
            sys.stderr.flush()
