"""Shared benchmark plumbing: where the data is, what machine this is, timed subprocess runs, result files."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FTCTL_BENCH_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results"
OUT = REPO / "bench" / "out"  # run directories (ignored by git)


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, {os.cpu_count()} CPU cores"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {mem:.0f} GiB RAM, no GPU"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "peft", "accelerate", "datasets")}


def _stamp() -> tuple[str, str]:
    return time.strftime("%Y-%m-%d"), ", ".join(f"{k} {v}" for k, v in versions().items())


def machine_line() -> str:
    """The `- machine: ...; date; versions` bullet that opens a result page."""
    date, libs = _stamp()
    return f"- machine: {machine()}; {date}; {libs}"


def invocation_line(module: str) -> str:
    """The opening sentence of a result page that names its command: `python -m MODULE`, date, machine, versions."""
    date, libs = _stamp()
    return f"`python -m {module}`, {date}, on {machine()}; {libs}."


def need_data(*relative: str) -> list[Path]:
    paths = [DATA / r for r in relative]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        sys.exit(f"benchmark data not found: {', '.join(missing)} (set FTCTL_BENCH_DATA to the shared data folder)")
    return paths


def attempt(cmd: list[str], log: Path, timeout: float | None = None) -> tuple[float, int]:
    """Run a command, its output to `log`; returns (wall seconds, exit code; 124 past `timeout`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return time.time() - started, code


def run(cmd: list[str], log: Path) -> float:
    """Run a command, its output to `log`; returns wall seconds. Fails loudly."""
    wall, code = attempt(cmd, log)
    if code:
        sys.exit(f"benchmark step failed ({code}): {' '.join(cmd)}; see {log}")
    return wall


def ftctl() -> str:
    """The `ftctl` command of this Python: beside the interpreter (a virtualenv), else the one on PATH (a GPU image's
    `pip install --target`, whose scripts land elsewhere)."""
    beside = Path(sys.executable).parent / "ftctl"
    return str(beside) if beside.is_file() else shutil.which("ftctl") or str(beside)


def save(name: str, payload: dict, markdown: str, history: bool = True) -> None:
    """bench/results/<name>.{json,md}, and (unless `history` is off: a check, not a measurement) an entry at the
    top of bench/RESULTS.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    if not history:
        return
    history = REPO / "bench" / "RESULTS.md"
    previous = (
        history.read_text()
        if history.exists()
        else "# Benchmark results\n\nNewest first; older results are kept for comparison.\n"
    )
    head, _, rest = previous.partition("\n## ")
    entry = f"## {stamp}: {name}\n\n{markdown.split(chr(10), 1)[1].strip()}\n"
    history.write_text(head.rstrip() + "\n\n" + entry + ("\n## " + rest if rest else ""))
