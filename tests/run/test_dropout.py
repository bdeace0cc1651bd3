"""launch.run.dropout.CpuDropout: a Bernoulli(p) mask with the stock dropout's scaling and gradient, seeded."""

from __future__ import annotations

import math

import pytest
import tiny
import torch

from launch.run.dropout import CpuDropout, use_cpu_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_and_scaling(p):
    torch.manual_seed(0)
    x = torch.randn(1_000_003)  # not a multiple of 4: the last 64-bit draw is used in part
    y = CpuDropout(p).train()(x)
    dropped = y == 0
    rate = dropped.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / x.numel())  # five standard deviations
    kept = ~dropped
    scale = 65536 / (65536 - round(p * 65536))
    assert torch.equal(y[kept], x[kept] * scale)
    assert abs(scale * (1 - p) - 1) < 1e-4  # p rounded to a multiple of 1/65536


def test_expectation_and_independence_of_positions():
    torch.manual_seed(1)
    y = CpuDropout(0.25).train()(torch.ones(400, 4096))
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    # each of the four 16-bit fields cut from one 64-bit draw drops at the same rate
    rates = (y.view(-1, 4) == 0).float().mean(0)
    assert torch.allclose(rates, torch.full((4,), 0.25), atol=0.005)
    # neighbouring elements are not correlated
    a, b = (y.view(-1, 2) == 0).float().unbind(1)
    assert abs(((a * b).mean() - a.mean() * b.mean()).item()) < 0.003


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 32, requires_grad=True)
    y = CpuDropout(0.3).train()(x)
    y.sum().backward()
    kept = (y != 0).float()
    assert torch.equal(x.grad, kept * (65536 / (65536 - round(0.3 * 65536))))


def test_eval_zero_one_dtype_and_seed():
    x = torch.randn(8, 16)
    assert torch.equal(CpuDropout(0.5).eval()(x), x)
    assert torch.equal(CpuDropout(0.0).train()(x), x)
    assert torch.equal(CpuDropout(1.0).train()(x), torch.zeros_like(x))
    assert CpuDropout(0.1).train()(x.bfloat16()).dtype == torch.bfloat16
    masks = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        masks.append(CpuDropout(0.5).train()(torch.ones(1000)) == 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_swapped_into_a_model_without_changing_its_weights():
    import transformers as t

    model = t.BertForSequenceClassification(tiny.bert_config(50))
    stock = sum(type(m) is torch.nn.Dropout for m in model.modules())
    keys = list(model.state_dict())
    assert stock > 0 and use_cpu_dropout(model) == stock
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert list(model.state_dict()) == keys
    model.eval()
    ids = torch.randint(0, 50, (2, 8))
    assert torch.isfinite(model(input_ids=ids).logits).all()
