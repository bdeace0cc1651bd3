"""Distributed runs for real, on CPU: DDP over gloo, DeepSpeed ZeRO-2/3, two launchers as two machines.

The default suite runs a representative subset (2-process DDP against 1 process, ZeRO-3 with LoRA, a launcher
whose peer never comes); `make test-slow` adds ZeRO-2, full fine-tuning under ZeRO-3 and the two-machine run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import cli, free_port, read_jsonl, run_json

from ftctl.errors import run_main

pytestmark = pytest.mark.distributed  # every test here starts several training processes

TOLERANCE = 1e-4  # relative: the same sums reduced in another order (gloo all-reduce vs one process)


@pytest.fixture(scope="module")
def setting(tmp_path_factory, models) -> dict[str, Path]:
    """A dropout-free tiny BERT (so 1 and 2 processes draw no different random masks) and an odd-sized
    validation set (uneven last batches across processes)."""
    import tiny
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    d = tmp_path_factory.mktemp("dist")
    model = AutoModelForMaskedLM.from_pretrained(
        models["bert"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.save_pretrained(d / "bert")
    AutoTokenizer.from_pretrained(models["bert"]).save_pretrained(d / "bert")
    return {
        "model": d / "bert",
        "train": tiny.write_jsonl(d / "train.jsonl", tiny.sentences(96, 2)),
        "validation": tiny.write_jsonl(d / "validation.jsonl", tiny.sentences(45, 3)),
        "root": d,
    }


def train_args(setting, out: Path, method: str = "lora", *extra: str) -> list[str]:
    return [
        "--task",
        "sst2",
        "--method",
        method,
        "--model",
        str(setting["model"]),
        "--train-file",
        str(setting["train"]),
        "--validation-file",
        str(setting["validation"]),
        "--output-dir",
        str(out),
        "--max-steps",
        "12",
        "--batch-size",
        "8",
        "--learning-rate",
        "5e-3",
        "--logging-steps",
        "1",
        "--report-to",
        "none",
        "--eval-strategy",
        "no",
        "--save-every",
        "6",
        *(["--lora-dropout", "0"] if method == "lora" else []),
        *extra,
    ]


def launch(*args: str, timeout: int = 600):
    result = cli("ftctl", "train", "--main-process-port", str(free_port()), *args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in run_json(run_dir)["history"] if "loss" in h]


def test_two_processes_follow_the_same_loss_curve_as_one(setting, tmp_path):
    from launch.train import main

    one = tmp_path / "one"
    main(train_args(setting, one))
    two = tmp_path / "two"
    launch("--num-processes", "2", *train_args(setting, two))
    record = run_json(two)
    assert record["launch"]["num_processes"] == 2 and record["launch"]["distributed_type"] == "multi_cpu"
    assert record["config"]["batch_size"] == 8 and len(losses(one)) == len(losses(two)) == 12
    assert losses(two) == pytest.approx(losses(one), rel=TOLERANCE)
    assert record["metrics"] == pytest.approx(run_json(one)["metrics"], rel=TOLERANCE)


def check_saved_result_reproduces(run_dir: Path, setting, method: str, tmp_path: Path) -> None:
    """Non-empty weights that reload without DeepSpeed and give the outputs the distributed run recorded, and
    a single-process `ftctl evaluate` that agrees with the distributed evaluation (no dropped/duplicated rows)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    weights = run_dir / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")
    assert weights.stat().st_size > 1000
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    if method == "lora":
        base = AutoModelForSequenceClassification.from_pretrained(setting["model"], num_labels=2)
        model = PeftModel.from_pretrained(base, run_dir)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(run_dir)
    rows = read_jsonl(run_dir / "predictions.jsonl")
    assert len(rows) == 45
    model.eval()
    with torch.no_grad():
        enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        probs = model(**enc).logits.softmax(-1)
    saved = torch.tensor([list(r["probabilities"].values()) for r in rows])
    torch.testing.assert_close(probs, saved, atol=1e-5, rtol=0)

    from launch.evaluate import main as evaluate

    single = evaluate([str(run_dir), "--split", "validation", "--output", str(tmp_path / "single.json")])
    distributed = run_json(run_dir)["metrics"]
    for key in ("accuracy", "f1", "precision", "recall"):
        assert single[key] == distributed[key], key
    assert single["info"]["examples"] == 45


@pytest.mark.parametrize(
    "stage,method",
    [
        ("zero3", "lora"),
        pytest.param("zero2", "lora", marks=pytest.mark.slow),
        pytest.param("zero2", "full", marks=pytest.mark.slow),
        pytest.param("zero3", "full", marks=pytest.mark.slow),
    ],
)
def test_deepspeed_on_two_cpu_processes(setting, tmp_path, stage, method):
    out = tmp_path / f"{stage}-{method}"
    launch("--num-processes", "2", *train_args(setting, out, method, "--deepspeed", stage))
    record = run_json(out)
    assert record["launch"]["deepspeed_stage"] == int(stage[-1])
    assert record["launch"]["distributed_type"] == "deepspeed" and record["launch"]["num_processes"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert not (out / ".checkpoint-staging").exists()
    from launch.train import setup
    from methods.base import parameter_counts

    single = parameter_counts(setup(train_args(setting, tmp_path / "single-setup", method)).model)
    assert (record["trainable_params"], record["total_params"]) == single  # ZeRO-3 partitions counted whole
    check_saved_result_reproduces(out, setting, method, tmp_path)


@pytest.mark.slow
def test_two_machines_on_one_host(setting, tmp_path):
    import subprocess

    from conftest import REPO

    out = tmp_path / "two-machines"
    port = str(free_port())
    common = [
        "--num-processes",
        "2",
        "--num-machines",
        "2",
        "--main-process-ip",
        "127.0.0.1",
        "--main-process-port",
        port,
        "--rendezvous-timeout",
        "120",
        *train_args(setting, out),
    ]
    exe = str(Path(__import__("sys").executable).parent / "ftctl")
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    second = subprocess.Popen(
        [exe, "train", "--machine-rank", "1", *common],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = subprocess.run(
        [exe, "train", "--machine-rank", "0", *common], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    _, err = second.communicate(timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, err[-3000:]
    record = run_json(out)
    assert record["launch"]["num_machines"] == 2 and record["launch"]["num_processes"] == 2
    assert json.loads((out / "spec.json").read_text())["config"]["method"] == "lora"
    assert len(list(out.glob("adapter_model.safetensors"))) == 1


def test_a_launcher_whose_peer_never_comes_fails_fast(setting, tmp_path):
    started = time.time()
    result = cli(
        "ftctl",
        "train",
        "--num-processes",
        "2",
        "--num-machines",
        "2",
        "--machine-rank",
        "0",
        "--main-process-ip",
        "127.0.0.1",
        "--main-process-port",
        str(free_port()),
        "--rendezvous-timeout",
        "5",
        *train_args(setting, tmp_path / "never"),
        timeout=120,
    )
    assert time.time() - started < 60
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did not all meet" in lines[0] and "within 5 s" in lines[0], result.stderr
    assert not (tmp_path / "never").exists()


def test_dry_run_prints_the_accelerate_command():
    result = cli(
        "ftctl",
        "train",
        "--accelerate-config",
        "deepspeed_zero3",
        "--num-processes",
        "4",
        "--dry-run",
        "--task",
        "sst2",
    )
    assert result.returncode == 0
    command = result.stdout.strip()
    assert "accelerate" in command and "deepspeed_zero3.yaml" in command and "--num_processes 4" in command
    assert command.endswith("-m launch.train --task sst2")


def test_processes_that_do_not_form_one_group_are_refused(setting, tmp_path, monkeypatch, capsys):
    """What `accelerate launch --cpu --num_processes 2` does on this machine: WORLD_SIZE says 2, but the process
    runs alone. Training would silently be a single-process run; it must stop instead."""
    from launch.train import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    code = run_main(main, train_args(setting, tmp_path / "alone"))
    assert code == 2 and "not one distributed group" in capsys.readouterr().err
    assert not (tmp_path / "alone").exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--deepspeed", "zero9"], "DeepSpeed config not found: zero9"),
        (["--deepspeed", "{bad}"], "is not valid JSON"),
        (["--accelerate-config", "nope"], "accelerate config not found"),
        (["--num-processes", "2", "--num-machines", "3"], "more than --num-processes"),
        (["--num-processes", "3", "--num-machines", "2", "--main-process-ip", "1.2.3.4"], "does not split evenly"),
    ],
)
def test_bad_launch_settings(setting, tmp_path, args, fragment):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}')
    args = [a.format(bad=bad) for a in args]
    result = cli("ftctl", "train", *args, *train_args(setting, tmp_path / "out"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigterm_to_the_launching_ftctl_alone_checkpoints_every_process(setting, tmp_path):
    """A scheduler's SIGTERM sent to the `ftctl train` process only (not its group): it is passed on to the launched
    processes, which checkpoint and say how to resume; ftctl exits 143 with their one line. Before, ftctl died at
    once and left its training processes running on, orphaned."""
    import signal
    import subprocess

    import psutil
    from conftest import REPO

    out = tmp_path / "stopped"
    args = train_args(setting, out)
    args[args.index("--max-steps") + 1] = "5000"  # far more than it gets to
    args[args.index("--save-every") : args.index("--save-every") + 2] = ["--save-strategy", "no"]
    exe = str(Path(__import__("sys").executable).parent / "ftctl")
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([exe, "train", "--num-processes", "2", "--main-process-port", str(free_port()), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    events, deadline = out / "events.jsonl", time.time() + 300
    while not (events.is_file() and '"step": 3' in events.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143 and len(lines) == 1 and lines[0].startswith("stopped: SIGTERM received"), err
    assert list(out.glob("checkpoint-*/spec.json"))
    # the command to continue is the user's own launch, with its launcher options
    assert "continue with: ftctl train --num-processes 2 --main-process-port" in lines[0]
    assert lines[0].endswith("--resume")
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
