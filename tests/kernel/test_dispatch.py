"""`ftctl`: the dispatcher. Import-light, one `error:` line for an unknown command, every command listed."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from launch import cli


def test_ftctl_help_imports_no_torch_and_no_transformers():
    probe = (
        "import sys, contextlib, io\n"
        "import launch.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert launch.cli.main(['--help']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"`ftctl --help` imported {done.stdout.strip()}"


def test_the_probe_sees_an_import_of_torch():
    """The check above can fail: a module that imports torch is seen."""
    probe = "import sys, tasks; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "True", done.stderr


def test_help_lists_every_command(capsys):
    assert cli.main([]) == 0
    shown = capsys.readouterr().out
    for name in ("train", "evaluate", "predict", "generate", "merge", "list", "plan", "grid", "report"):
        assert f"\n  {name} " in shown, name


def test_an_unknown_command_is_one_error_line_and_exit_2(capsys):
    assert cli.main(["trian", "--task", "sst2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown command 'trian'") and "train" in err


def test_a_command_s_help_exits_0_and_a_bad_option_2(capsys):
    assert cli.main(["report", "--help"]) == 0
    assert "usage: ftctl report" in capsys.readouterr().out
    assert cli.main(["list", "--no-such-flag"]) == 2


def test_train_help_starts_with_usage_and_says_which_defaults_depend_on_the_task(capsys):
    assert cli.main(["train", "--help"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: ftctl train"), shown[:200]
    flat = " ".join(shown.split())
    assert "--epochs EPOCHS training epochs (default: 3.0; per task and method)" in flat
    assert "--batch-size BATCH_SIZE global batch size" in flat and "(default: 16)" in flat  # no task sets it
    assert shown.index("--dry-run") > shown.index("--epochs"), "the launcher's options come after training's"
