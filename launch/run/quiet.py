"""Keep library chatter (load reports, hub retries, kernel probes, per-step prints) out of the user's terminal.

ftctl prints its own summary and progress; set FTCTL_VERBOSE=1 to see the libraries' own logs again.
"""

from __future__ import annotations

import logging
import os
import warnings


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
