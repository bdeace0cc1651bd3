"""`ftctl merge`: LoRA-family adapters folded into a plain transformers model with the fine-tuned outputs; a quantized
base merged into its de-quantized weights; everything else refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, data_args

from ftctl.errors import FtctlError

SHORT = [
    "--max-steps",
    "6",
    "--batch-size",
    "8",
    "--eval-strategy",
    "no",
    "--save-strategy",
    "no",
    "--report-to",
    "none",
    "--learning-rate",
    "1e-2",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread per test process (see test_method_matrix.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def trained(models, data, tmp_path):
    """A short run of `method` on a tiny model; returns the run directory."""
    from launch.train import main

    def run(method: str, family: str, *extra: str):
        out = tmp_path / f"{family}-{method}"
        argv = ["--task", "sst2", "--method", method, "--model", str(models[family]), *data_args(data, test=False)]
        main([*argv, *SHORT, *extra, "--output-dir", str(out)])
        return out

    return run


def logits(model, tokenizer) -> torch.Tensor:
    texts = ["a good film", "the plot was awful and dull", "lovely music", "boring story and poor acting"]
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.float()


def fine_tuned(run_dir):
    """The run's model as `ftctl evaluate` loads it (base + adapter, quantized where the run was)."""
    from ftctl.models import load_kwargs, load_tokenizer
    from launch.run import runs
    from launch.run.runs import locate

    weights, spec = locate(str(run_dir))
    base = json.loads((weights / "adapter_config.json").read_text())["base_model_name_or_path"]
    run = runs.from_record(spec["config"], spec["task_state"], "test", model=base)
    tokenizer = load_tokenizer(str(weights))
    kwargs = {**load_kwargs(run.cfg), **run.method.load_kwargs(run.context())}
    return run.method.load_trained(run.task, str(weights), base, tokenizer, kwargs), tokenizer


@pytest.mark.parametrize(
    ("method", "family", "extra"),
    [
        ("lora", "bert", []),
        ("dora", "gpt2", []),  # GPT-2's Conv1D layers, DoRA's magnitude vector
        ("rslora", "llama", ["--target-modules", "all-linear"]),
        ("adalora", "t5", []),
        ("ia3", "llama", []),
    ],
)
def test_merged_model_loads_with_transformers_and_gives_the_fine_tuned_outputs(
    models, trained, tmp_path, method, family, extra, capsys
):
    from transformers import AutoModelForSequenceClassification

    from launch.merge import main as merge

    run_dir = trained(method, family, *extra)
    out = tmp_path / "merged"
    capsys.readouterr()
    info = merge([str(run_dir), "--output", str(out)])
    said = " ".join(capsys.readouterr().out.split())
    assert f"merged the {method} adapter with its base ({models[family]}) into {out}; the base is unchanged" in said
    assert info["method"] == method and info["notes"] == []
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and json.loads((out / "merge.json").read_text())["method"] == method
    assert not (out / "adapter_config.json").exists()

    merged = AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers, no peft
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    model, tokenizer = fine_tuned(run_dir)
    expected = logits(model, tokenizer)
    torch.testing.assert_close(logits(merged, tokenizer), expected, rtol=1e-4, atol=1e-5)
    base = dict(AutoModelForSequenceClassification.from_pretrained(models[family], num_labels=2).named_parameters())
    moved = [n for n, p in merged.named_parameters() if n in base and not torch.equal(p, base[n])]
    assert any(".0." in n for n in moved), "the adapter was folded into the blocks' weights"


@pytest.mark.parametrize(("method", "family"), [("qlora", "gpt2"), ("qlora8", "t5")])
def test_quantized_base_is_merged_into_its_dequantized_weights(trained, tmp_path, method, family):
    from transformers import AutoModelForSequenceClassification

    from launch.merge import main as merge

    run_dir = trained(method, family)
    out = tmp_path / "merged"
    # 6 steps leave near-even probabilities, which the quantized product and the fp32 one may tip apart
    info = merge([str(run_dir), "--output", str(out), "--max-disagreement", "10"])
    assert len(info["notes"]) == 1 and "de-quantized" in info["notes"][0]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["agreement"] >= 0.9 and 0 < parity["largest_logit_difference"] < 0.05
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    model, tokenizer = fine_tuned(run_dir)
    expected = logits(model, tokenizer)
    # the quantized model multiplies in bf16 (4-bit) or int8; the merged one in fp32 on the same weights
    torch.testing.assert_close(logits(merged, tokenizer), expected, rtol=0.05, atol=0.05)


def test_what_cannot_be_merged_is_refused_before_anything_is_written(trained, tmp_path):
    from launch.merge import main as merge

    out = tmp_path / "merged"
    for method, reason in (
        ("adapter", "non-linear"),
        ("prompt_tuning", "virtual tokens are inputs"),
        ("head", "already holds a full model"),
    ):
        run_dir = trained(method, "bert")
        with pytest.raises(FtctlError, match=f"method '{method}' has nothing to merge: .*{reason}"):
            merge([str(run_dir), "--output", str(out)])
        assert not out.exists()

    run_dir = trained("lora", "bert")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FtctlError, match="already exists and is not empty"):
        merge([str(run_dir), "--output", str(out)])
    with pytest.raises(FtctlError, match="does not hold an earlier merge"):
        merge([str(run_dir), "--output", str(out), "--overwrite"])
    assert (out / "keep.txt").read_text() == "mine"
    other = tmp_path / "again"
    merge([str(run_dir), "--output", str(other)])
    merge([str(run_dir), "--output", str(other), "--overwrite"])  # an earlier merge may be replaced
    assert (other / "merge.json").is_file()


def test_merge_command_line(tmp_path):
    result = cli("ftctl", "merge", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: run directory not found: {tmp_path / 'nowhere'}"
    result = cli("ftctl", "merge", "--help")
    assert result.returncode == 0 and "--output DIR" in result.stdout
