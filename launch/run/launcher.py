"""`ftctl train` launcher options: build the `accelerate launch ... -m launch.train ...` command.

With none of these options, `ftctl train` runs `launch.train.main` in this process. With any of them, it runs
accelerate's launcher, which starts the processes (on this machine, or this machine's share of a multi-node job);
each process runs the same `launch.train.main` with the same training options.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ftctl.errors import FtctlError, Terminated
from ftctl.options import Parser
from launch.run.configs import (
    ACCELERATE_CONFIGS,
    child_environment,
    read_accelerate,
    resolve_accelerate_config,
    shipped_deepspeed,
)


def launcher_parser() -> Parser:
    parser = Parser(prog="ftctl train", add_help=False)
    group = parser.add_argument_group("launcher (ftctl train only)")
    group.add_argument(
        "--accelerate-config",
        metavar="NAME|PATH",
        help=f"accelerate config: a file in {ACCELERATE_CONFIGS.name}/ (without .yaml) or a path",
    )
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in total, over all machines")
    group.add_argument("--num-machines", type=int, metavar="M", help="machines taking part")
    group.add_argument("--machine-rank", type=int, metavar="R", help="this machine's rank (0 = main)")
    group.add_argument("--main-process-ip", metavar="IP", help="address of the rank-0 machine")
    group.add_argument("--main-process-port", type=int, metavar="PORT", help="free TCP port on the rank-0 machine")
    group.add_argument(
        "--rendezvous-timeout",
        type=int,
        default=300,
        metavar="S",
        help="seconds the launchers wait for each other before failing (default: 300)",
    )
    group.add_argument("--dry-run", action="store_true", help="print the launch command instead of running it")
    return parser


def launcher_help() -> str:
    """The launcher options' section of `ftctl train --help`."""
    parser = launcher_parser()
    formatter = parser._get_formatter()
    for group in parser._action_groups:
        if group.title and group.title.startswith("launcher"):
            formatter.start_section(group.title)
            formatter.add_arguments(group._group_actions)
            formatter.end_section()
    return formatter.format_help()


def split(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(launcher options, the remaining training arguments)."""
    if any(a in ("-h", "--help") for a in argv):
        return {}, argv
    options, rest = launcher_parser().parse_known_args(argv)
    for key in ("num_processes", "num_machines"):
        value = getattr(options, key)
        if value is not None and value < 1:
            raise FtctlError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    return vars(options), rest


RESUME_PROG = "FTCTL_RESUME_PROG"  # how a launched run's "continue with" line starts: the user's own launch


def launcher_argv(options: dict[str, Any]) -> list[str]:
    """The launcher options as flags, the defaults left out (a stopped run's resume command repeats them)."""
    out: list[str] = []
    for action in launcher_parser()._actions:  # noqa: SLF001 - argparse keeps its actions only there
        value = options.get(action.dest)
        if action.dest == "dry_run" or value is None or value == action.default:
            continue
        out += [action.option_strings[0], str(value)]
    return out


def wants_launcher(options: dict[str, Any]) -> bool:
    return bool(
        options.get("accelerate_config")
        or (options.get("num_processes") or 1) > 1
        or (options.get("num_machines") or 1) > 1
        or options.get("dry_run")
    )


def build_command(options: dict[str, Any], train_argv: list[str]) -> list[str]:
    """The accelerate launch command for these launcher options and training arguments."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    config: dict[str, Any] = {}
    if options.get("accelerate_config"):
        path = resolve_accelerate_config(options["accelerate_config"])
        config = read_accelerate(path)
        cmd += ["--config_file", str(path)]
        ds_file = (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file and not Path(ds_file).is_file() and shipped_deepspeed(ds_file).is_file():
            cmd += ["--deepspeed_config_file", str(shipped_deepspeed(ds_file))]  # shipped configs name shipped files
    processes = options.get("num_processes") or config.get("num_processes") or 1
    machines = options.get("num_machines") or config.get("num_machines") or 1
    if machines > processes:
        raise FtctlError(f"--num-machines {machines} is more than --num-processes {processes} (processes in total)")
    if processes % machines:
        raise FtctlError(f"--num-processes {processes} does not split evenly over --num-machines {machines}")
    check_process_count(options, config, processes, machines)
    if not config and processes > 1:
        cmd.append("--multi_gpu")  # accelerate's multi-process launcher; runs on the CPU when there is no GPU
    if not config:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]  # ftctl's own --precision decides
    for flag, key in (
        ("--num_processes", "num_processes"),
        ("--num_machines", "num_machines"),
        ("--machine_rank", "machine_rank"),
        ("--main_process_ip", "main_process_ip"),
        ("--main_process_port", "main_process_port"),
    ):
        if options.get(key) is not None:
            cmd += [flag, str(options[key])]
    port = options.get("main_process_port")
    if port is not None and not 1 <= port <= 65535:
        raise FtctlError(f"--main-process-port must be a TCP port (1-65535), got {port}")
    rank = options.get("machine_rank")
    if rank is not None and not 0 <= rank < machines:
        raise FtctlError(f"--machine-rank {rank} is not one of the {machines} machine(s): use 0 to {machines - 1}")
    if machines > 1 and not options.get("main_process_ip") and not config.get("main_process_ip"):
        raise FtctlError("a multi-machine run needs --main-process-ip (the rank-0 machine's address)")
    if not config:  # accelerate warns about every launch setting left to its defaults
        cmd += [] if options.get("num_processes") is not None else ["--num_processes", str(processes)]
        cmd += [] if options.get("num_machines") is not None else ["--num_machines", str(machines)]
    if processes > 1:
        if options["rendezvous_timeout"] <= 0:
            raise FtctlError(f"--rendezvous-timeout must be greater than 0, got {options['rendezvous_timeout']}")
        cmd += ["--rdzv_conf", f"timeout={options['rendezvous_timeout']}"]
    return [*cmd, "-m", "launch.train", *train_argv]


def check_process_count(options: dict[str, Any], config: dict[str, Any], processes: int, machines: int) -> None:
    """Refuse more processes per machine than the accelerate config or this machine allows: accelerate would start
    a single process for a single-process config (the run silently trains alone), fail on a config that lists fewer
    GPUs than processes, and start processes that find no GPU of their own."""
    per_machine = processes // machines
    if per_machine < 2:
        return
    name = options.get("accelerate_config")
    if config and str(config.get("distributed_type")).upper() in ("NO", "FALSE"):  # YAML reads a bare NO as false
        raise FtctlError(
            f"accelerate config '{name}' runs a single process (distributed_type: NO), but {processes} processes "
            "were asked for; use a multi-process config (multi_gpu, cpu_2proc, deepspeed_zero2, ...) or "
            "--num-processes 1"
        )
    if config.get("use_cpu"):
        return
    gpu_ids = str(config.get("gpu_ids") or "all").strip()
    if gpu_ids != "all":
        ids = [i for i in gpu_ids.split(",") if i.strip()]
        if per_machine > len(ids):
            raise FtctlError(
                f"accelerate config '{name}' lists {len(ids)} GPU(s) in gpu_ids ({gpu_ids}) but asks for "
                f"{per_machine} processes per machine; lower --num-processes to {len(ids) * machines} or list more "
                "gpu_ids"
            )
    if options.get("dry_run"):
        return  # the command may be for other machines
    gpus = visible_gpus()
    if 0 < gpus < per_machine:  # without a GPU, the processes run on the CPU
        raise FtctlError(
            f"{per_machine} processes per machine asked for, but this machine has {gpus} GPU(s) and each process "
            f"needs its own; use --num-processes {gpus * machines} (one per GPU) or fewer"
        )


def visible_gpus() -> int:
    """CUDA devices the launched processes can use (0 on a machine without CUDA). Imports torch: launch time only."""
    return torch.cuda.device_count()


def launch(options: dict[str, Any], train_argv: list[str]) -> int:
    cmd = build_command(options, train_argv)
    if options.get("dry_run"):
        print(shlex.join(cmd))
        return 0
    env = child_environment({RESUME_PROG: shlex.join(["ftctl", "train", *launcher_argv(options)])})
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    relay = StderrRelay(options)
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            relay.feed(line)
    except (Terminated, KeyboardInterrupt) as stop:
        # the launched processes checkpoint and say how to resume; Ctrl-C reached them already (the terminal sends
        # it to the whole process group), a SIGTERM sent to this process alone is passed on
        if isinstance(stop, Terminated):
            proc.send_signal(signal.SIGTERM)
        for line in proc.stderr:
            relay.feed(line)
    relay.close()
    code = proc.wait()
    if code and (relay.explained or relay.usage_error):
        return 2  # a usage error, already explained in one line
    if code and relay.stopped is not None:
        return relay.stopped
    return code


class StderrRelay:
    """Passes the launched processes' stderr through, with three changes: the same `error:` line from several
    processes is shown once; the launcher's own traceback for a rendezvous timeout becomes one line saying what to
    check; and its ChildFailedError report, which only repeats that a process failed, is dropped (the process
    already said why)."""

    TIMEOUT_SIGNS = ("DistStoreError", "DistNetworkError", "waiting for clients", "timed out", "Timed out")
    # c10d/torch-elastic log lines and C++ stack dumps: noise once the failure is explained in one line
    NOISE = re.compile(
        r"^((\[rank\d+\]:)?\[[WI]\d{4} |\[?[EWIF]\d{4} \d\d:\d\d:\d\d|frame #\d+:|Exception raised from "
        r"|<omitting python frames>"
        # accelerate's notice that it picked another free port (another launch holds the default): it then works
        r"|.*UserWarning: Port `\d+` is already in use|\s+warnings\.warn\(\s*$)"
    )

    def __init__(self, options: dict[str, Any]):
        self.options = options
        self.seen: set[str] = set()
        self.block: list[str] | None = None
        self.silent = False
        self.explained = False
        self.usage_error = False
        self.stopped: int | None = None

    def feed(self, line: str) -> None:
        if self.silent:
            return
        if self.block is not None:
            self.block.append(line)
            if line.strip() and not line.startswith((" ", "\t")) and not line.startswith("Traceback"):
                self._finish_block()
            return
        if line.startswith("Traceback (most recent call last)"):
            self.block = [line]
            return
        if self.NOISE.match(line) or not line.strip():
            return
        if line.startswith(("error: ", "stopped: ")):
            if line in self.seen:
                return
            self.seen.add(line)
            self.usage_error |= line.startswith("error: ")
            if line.startswith("stopped: "):
                self.stopped = 128 + (signal.SIGINT if "SIGINT" in line else signal.SIGTERM)
        sys.stderr.write(line)

    def _finish_block(self) -> None:
        block, self.block = self.block or [], None
        last = block[-1]
        if "ChildFailedError" in last:
            self.silent = True
        elif any(sign in last for sign in self.TIMEOUT_SIGNS):
            self.silent = self.explained = True
            o = self.options
            where = f"{o.get('main_process_ip') or 'the main machine'}:{o.get('main_process_port') or 29500}"
            sys.stderr.write(
                f"error: the launchers did not all meet at {where} within {o['rendezvous_timeout']} s "
                f"({last.strip().split(': ', 1)[-1]}); start the same ftctl train command on every machine with its "
                "own --machine-rank, and check --main-process-ip, --main-process-port and the firewall\n"
            )
        else:
            sys.stderr.writelines(block)

    def close(self) -> None:
        if self.block:
            sys.stderr.writelines(self.block)
