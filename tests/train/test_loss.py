import pytest
import torch
import torch.nn.functional as F

from tracetune.train import loss as loss_module
from tracetune.train.loss import linear_cross_entropy


def _reference(hidden, weight, targets, softcap, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = F.linear(hidden, weight)
        logits = logits.float() if autocast else logits
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, reduction="sum")


def _loss_and_grads(fn, hidden, weight, targets, softcap, autocast, scale):
    hidden, weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = (
            fn(hidden, weight, targets, softcap, autocast) if fn is _reference else fn(hidden, weight, targets, softcap)
        )
    (value * scale).backward()
    return value.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_matches_autograd_in_float64_across_chunks(monkeypatch, softcap):
    monkeypatch.setattr(loss_module._LinearCrossEntropy, "CHUNK_ENTRIES", 7 * 300)  # 7 rows per chunk, 37 rows
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=g)
    weight = torch.randn(300, 16, dtype=torch.float64, generator=g)
    targets = torch.randint(0, 300, (37,), generator=g)
    ours = _loss_and_grads(linear_cross_entropy, hidden, weight, targets, softcap, False, 0.37)
    theirs = _loss_and_grads(_reference, hidden, weight, targets, softcap, False, 0.37)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_under_autocast_equals_autocast_linear_then_fp32_cross_entropy():
    """bf16 matmuls and an fp32 softmax, like autocast; with an incoming gradient of 1 the bits agree."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, 32, generator=g)
    weight = torch.randn(500, 32, generator=g) / 4
    targets = torch.randint(0, 500, (20,), generator=g)
    ours = _loss_and_grads(linear_cross_entropy, hidden, weight, targets, 0.0, True, 1.0)
    theirs = _loss_and_grads(_reference, hidden, weight, targets, 0.0, True, 1.0)
    assert ours[1].dtype == ours[2].dtype == torch.float32  # gradients in the parameters' dtype
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=0)  # summation order
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-4, atol=1e-6)  # one matmul versus autograd's


def test_frozen_weight_gets_no_gradient():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(50, 8)  # a LoRA run's frozen LM head
    linear_cross_entropy(hidden, weight, torch.randint(0, 50, (5,))).backward()
    assert hidden.grad is not None and weight.grad is None
