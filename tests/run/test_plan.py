"""The memory and time planner (launch/plan.py, `ftctl plan`): predictions made on fake tensors, before any weight is
read, against what real training runs measure on this CPU, one run per method family; the CLI on a run and on a
grid, with `--gpu-memory` fitting and advice; bad input."""

from __future__ import annotations

import json

import pytest
from conftest import cli, data_args, run_json

SHORT = ["--max-length", "16", "--batch-size", "8", "--max-steps", "3", "--eval-strategy", "no", "--plan"]


@pytest.fixture
def same_length(tmp_path):
    """Examples of one length: every batch has the planned (longest) shape, which the CPU probe measures."""
    import tiny

    rows = [{"sentence": tiny.sentences(1, 7)[0]["sentence"], "label": i % 2} for i in range(48)]
    path = tiny.write_jsonl(tmp_path / "same.jsonl", rows)
    return ["--train-file", str(path), "--validation-file", str(path), "--test-file", str(path)]


@pytest.mark.parametrize(
    ("family", "method"),
    [("bert", "full"), ("bert", "lora"), ("llama", "qlora"), ("llama", "prefix_tuning"), ("gpt2", "adapter")],
)
def test_prediction_within_15_percent_of_the_measured_peak(train, same_length, family, method):
    """A real training run records its prediction and its measured CPU allocation peak (one profiled step of the
    planned shape): they agree within the issue's 15%, for each method family."""
    run_dir = train(*SHORT, *same_length, family=family, method=method, name=f"{family}-{method}")
    recorded = run_json(run_dir)["plan"]
    predicted, measured = recorded["predicted"], recorded["measured"]
    assert measured["peak_memory_mb"], measured["how"]
    assert abs(recorded["error"]["peak_memory"]) <= 0.15, (predicted["parts_mb"], measured)
    # the parts are those of the method: trainable parameters only where it trains them
    trainable = predicted["parameters"]["trainable"]
    total = trainable + predicted["parameters"]["frozen"]
    assert (trainable == total) == (method == "full")
    if method == "qlora":
        assert predicted["parameters"]["quantized"] > 0 and "4 bits" in predicted["notes"][0]
    assert 0 < predicted["shape"]["length"] <= 16 and predicted["flops_per_step"] > 0
    assert predicted["rate_tflops"] > 0 and recorded["error"]["train_time"] is not None


@pytest.mark.parametrize("method", ["lora", "full"])
def test_decoder_lm_with_the_lean_loss_and_accumulation(same_length, method, tmp_path):
    """A decoder answering in text (Llama-3 chat layout) trains with the lean LM loss, whose labelled positions
    fake tensors cannot find and whose output layer runs once per chunk; two micro-steps accumulate gradients."""
    import chat_models

    from launch.train import main

    model = chat_models.save_chat_model("llama3", tmp_path / "llama3")
    run_dir = tmp_path / method
    extra = ["--micro-batch-size", "4", "--max-length", "96", "--report-to", "none"]
    main(["--task", "sst2_t2t", "--method", method, "--model", str(model), *same_length, "--output-dir", str(run_dir),
          *SHORT, *extra])  # fmt: skip
    record = run_json(run_dir)
    assert record["loss_kernel"]["used"] == "chunked"
    plan = record["plan"]
    assert plan["predicted"]["shape"]["accumulation"] == 2
    assert abs(plan["error"]["peak_memory"]) <= 0.15, (plan["predicted"]["parts_mb"], plan["measured"])


def test_probe_is_not_skewed_by_an_earlier_window():
    """The CPU probe, twice in one process: a block allocated inside the first profiled window outlives it (c10
    keeps counting it); the second window still measures its own peak (4 MiB over the live weights)."""
    import torch

    from launch.run.planning.measure import AllocationProbe
    from launch.run.planning.prediction import Shape

    model = torch.nn.Linear(64, 64)
    live = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    kept = []
    for _ in range(2):
        probe = AllocationProbe(Shape(1, 1, 1, "fp32", "cpu", length=4))
        probe.armed = True
        probe.on_step_begin(None, None, None, model=model, optimizer=None)
        scratch = torch.ones(1024, 1024)  # 4 MiB, freed within the window
        del scratch
        kept.append(torch.ones(256, 1024))  # 1 MiB allocated in the window, alive after it
        probe.on_step_end(None, None, None)
        assert probe.measured_mb == pytest.approx(live + 4, abs=0.05)


def test_the_training_log_has_no_profiler_lines(train, same_length, capfd):
    """The measured side profiles one step on the CPU; the profiler's own notices (kineto's USDT lines, c10's
    warning about blocks allocated before the window) stay out of the log, which is still written."""
    run_dir = train(*SHORT, *same_length, "--logging-steps", "1")
    out, err = capfd.readouterr()
    assert run_json(run_dir)["plan"]["measured"]["peak_memory_mb"]  # the profiler ran
    log = out + err
    assert "step" in log.lower() or "loss" in log.lower(), log[-2000:]
    for noise in ("USDT", "profiler_start", "profiler_stop", "CPUAllocator", "unknown size"):
        assert noise not in log, log[-2000:]


def test_what_else_the_profiled_step_writes_is_kept_and_the_log_given_back(capfd):
    """Lines other than the profiler's, written to descriptor 2 in the window, come back in order; a window that
    training left open (an error within the step) is closed and descriptor 2 is the log's again."""
    import os

    import torch

    from launch.run.planning.measure import AllocationProbe, probed
    from launch.run.planning.prediction import Shape

    model = torch.nn.Linear(8, 8)
    probe = AllocationProbe(Shape(1, 1, 1, "fp32", "cpu", length=4))
    with pytest.raises(RuntimeError, match="in the step"), probed(probe):
        probe.armed = True
        probe.on_step_begin(None, None, None, model=model, optimizer=None)
        os.write(2, b"a real warning\n")
        os.write(2, b"USDT:2026-12-05 10:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"the next line\n")
        raise RuntimeError("in the step")
    os.write(2, b"after the window\n")
    err = capfd.readouterr().err
    assert "a real warning\nthe next line\nafter the window\n" in err and "USDT" not in err
    assert probe.profiler is None and probe.quiet.saved is None


def test_ftctl_verbose_keeps_the_profilers_lines(capfd, monkeypatch):
    """FTCTL_VERBOSE=1 shows the libraries' own output again (launch/run/quiet.py), the profiler's included."""
    import os

    from launch.run.quiet import QuietProfiler

    monkeypatch.setenv("FTCTL_VERBOSE", "1")
    quiet = QuietProfiler()
    quiet.open()
    os.write(2, b"USDT:2026-12-05 10:00:00 1:1 SyncActivityProfilerHandler.cpp:59] profiler_stop\n")
    quiet.close()
    assert "profiler_stop" in capfd.readouterr().err


def test_no_plan_records_none(train):
    run_dir = train("--max-steps", "2", "--no-plan")
    assert run_json(run_dir)["plan"] is None


def test_zero_stages_shard_the_parts():
    """What the single-process trace cannot see: ZeRO divides optimizer states (1), gradients (2) and weights (3)
    over the processes, DDP adds its gradient buckets, offload moves the optimizer states to the CPU."""
    from ftctl.facts import LaunchFacts
    from launch.run.planning.accounting import launch_parts

    def parts(**launch):
        base = {"weights": 400.0, "gradients": 100.0, "optimizer": 200.0, "activations": 50.0}
        return launch_parts(base, LaunchFacts(**launch), 10.0)

    assert parts(num_processes=1) == ({"weights": 400, "gradients": 100, "optimizer": 200, "activations": 50}, 0)
    assert parts(num_processes=2, distributed_type="multi")[0]["ddp buckets"] == 100
    zero1 = parts(num_processes=4, deepspeed_stage=1, distributed_type="deepspeed")[0]
    assert (zero1["optimizer"], zero1["gradients"], zero1["weights"]) == (50, 100, 400)
    zero3 = parts(num_processes=4, deepspeed_stage=3, distributed_type="deepspeed")[0]
    assert (zero3["optimizer"], zero3["gradients"], zero3["weights"], zero3["zero-3 gathered layers"]) == (
        50,
        25,
        100,
        20,
    )
    offloaded, moved = parts(num_processes=2, deepspeed_stage=2, deepspeed_offload=True, distributed_type="deepspeed")
    assert offloaded["optimizer"] == 0 and moved == 100


def test_sizes_and_quantized_storage():
    from ftctl.errors import FtctlError
    from launch.run.planning.accounting import quantized_bytes
    from launch.run.planning.fit import parse_size

    assert parse_size("16GiB") == 16 * 1024 and parse_size("16") == 16 * 1024 and parse_size("512MiB") == 512
    assert parse_size("16GB") == pytest.approx(16e9 / 2**20)
    with pytest.raises(FtctlError, match="not a size"):
        parse_size("lots")
    assert quantized_bytes(64 * 256, 4) == pytest.approx(64 * 256 * (0.5 + 1 / 64) + 4)
    assert quantized_bytes(1024, 8) == 1024 + 64


def test_plan_cli_run_fit_and_advice(models, data, tmp_path):
    """`ftctl plan` with train options: the table, the JSON rows, and with a GPU too small for the run at its
    batch size, the change that makes it fit (checked: that change's own prediction fits)."""
    out = tmp_path / "plan.json"
    model = ["--task", "sst2", "--model", str(models["bert"]), *data_args(data), "--max-length", "16"]
    args = [*model, "--method", "full", "--batch-size", "64", "--json", str(out)]
    fits = cli("ftctl", "plan", *args, "--gpu-memory", "2GiB")
    assert fits.returncode == 0, fits.stderr
    assert "ftctl plan" in fits.stdout and "yes" in fits.stdout
    row = json.loads(out.read_text())[0]
    peak = row["prediction"]["peak_memory_mb"]
    # a limit between the run's need and the need of its smallest micro-batch: the planner must find a remedy
    need = peak * 1.1 + 512
    tight = cli("ftctl", "plan", *args, "--gpu-memory", f"{need - 0.3 * peak * 1.1:.1f}MiB")
    assert tight.returncode == 0, tight.stderr
    advice = json.loads(out.read_text())[0]
    assert advice["fits"] == "no" and advice["advice"].startswith("fits with --gradient-checkpointing"), advice


def test_plan_cli_grid(models, data, tmp_path):
    """`ftctl plan GRID.yaml`: one row per cell, seeds sharing a row. T5's classification head checks its inputs'
    values (every row ends in one EOS), which fake tensors do not have: its row says it was not predicted, and
    the other rows are still made."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: plan\n"
        f"models: {{bert: {models['bert']}, t5: {models['t5']}}}\n"
        "tasks: [sst2]\nmethods: [full, lora]\nseeds: [1, 2]\n"
        f"settings: {{train_file: {data['train']}, validation_file: {data['validation']}, max_length: 16}}\n"
    )
    out = tmp_path / "rows.json"
    result = cli("ftctl", "plan", str(grid), "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 4, [r["run"] for r in rows]
    assert all("__seed" not in r["run"] for r in rows)
    assert all(r.get("peak") for r in rows if r["run"].startswith("bert")), rows
    assert all(r["advice"].startswith("not predicted") for r in rows if r["run"].startswith("t5")), rows


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu-memory", "huge"], "is not a size"),
        (["--tflops", "0"], "--tflops must be positive"),
        (["--json", "/nonexistent/dir/plan.json"], "its folder does not exist"),
        (["--method", "nope"], "unknown method"),
    ],
)
def test_plan_bad_input(args, message, models, data):
    result = cli("ftctl", "plan", "--task", "sst2", "--model", str(models["bert"]), *data_args(data), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
