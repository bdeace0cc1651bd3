"""User-facing errors: one readable line, exit code 2, nothing written."""

from __future__ import annotations

import difflib
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

EXIT_USAGE = 2


class FtctlError(Exception):
    """A problem with what the user asked for (bad option, bad data, impossible combination).

    Raised anywhere; the entry points print ``error: <message>`` on one line and exit with code 2.
    The message says what is wrong and how to fix it.
    """

    exit_code = EXIT_USAGE
    label = "error"

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def suggest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def warn(message: str) -> None:
    """A legal but suspicious input, or something the user should know: one `warning:` line on stderr."""
    print(f"warning: {' '.join(message.split())}", file=sys.stderr)


class Terminated(BaseException):  # not Exception: libraries catch those broadly, as they do not KeyboardInterrupt
    """SIGTERM outside training (which checkpoints on it, launch/run/reliability.py): stop like Ctrl-C does."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run an entry point; a user error becomes one `error: ...` line on stderr and exit code 2. Ctrl-C and SIGTERM
    stop it with one line (exit 130 and 143): every file is written whole or not at all (launch/run/rundir.py)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        main(argv)
    except FtctlError as exc:
        print(f"{exc.label}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM); nothing half-written is left", file=sys.stderr)
        return 143
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0
