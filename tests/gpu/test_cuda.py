"""On a CUDA GPU (tier `gpu`: skipped without one; bench/gpu_device.sh runs them on a lent device): a run trains in
bf16 on the device, QLoRA's base is really 4-bit there, and what was saved reloads with the same scores."""

from __future__ import annotations

import pytest
from conftest import assert_loss_fell, run_json

pytestmark = pytest.mark.gpu


def test_bf16_lora_trains_on_the_gpu_and_reloads_with_its_scores(train):
    from launch.evaluate import main as evaluate

    out = train("--precision", "bf16", family="llama", name="bf16")
    record = run_json(out)
    assert record["device"]["type"] == "cuda" and record["precision"] == "bf16"
    assert record["peak_cuda_allocated_mb"] > 0
    assert_loss_fell(out)
    scored = evaluate([str(out), "--split", "validation"])
    assert scored["accuracy"] == pytest.approx(record["metrics"]["accuracy"], abs=1e-6)


def test_qlora_base_is_4bit_on_the_gpu(train, monkeypatch):
    import bitsandbytes as bnb

    from launch.run.trainer import FtctlTrainer

    trained = {}
    original = FtctlTrainer.train

    def capture(self, *args, **kwargs):
        trained["model"] = self.model
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FtctlTrainer, "train", capture)
    out = train("--precision", "bf16", family="llama", method="qlora", name="qlora")
    record = run_json(out)
    assert record["device"]["type"] == "cuda" and record["method"]["quantization"]["bits"] == 4
    assert_loss_fell(out)
    layers = [m for m in trained["model"].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers), "the base's linear layers are 4-bit"
