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


def _tiny(arch: str, dtype=torch.float64):
    from tracetune.models.sources import load_model, load_tokenizer

    tokenizer = load_tokenizer(f"tiny:{arch}")
    return load_model(f"tiny:{arch}", tokenizer).to(dtype), tokenizer


def _batch(tokenizer, vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(8, vocab, (3, 12), generator=g)
    ids[0, :4] = tokenizer.pad_token_id  # left padding: the padding row must get no gradient
    mask = (ids != tokenizer.pad_token_id).long()
    labels = ids.clone()
    labels[:, :6] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_tied_gradient_equals_autograds_over_accumulated_micro_batches(monkeypatch, arch):
    """Two micro-batches with left padding: the buffer holds what autograd would have put in .grad (float64,
    to 1e-12; the embedding's padding row included), and every other parameter's gradient is unchanged."""
    from tracetune.train.loss import TiedGradient, loss_sum

    monkeypatch.setattr(loss_module._LinearCrossEntropy, "TIED_GRAD_ROWS", 7)  # the head's gradient in slices
    model, tokenizer = _tiny(arch)
    batches = [_batch(tokenizer, model.config.vocab_size), _batch(tokenizer, model.config.vocab_size)]
    batches[1]["labels"][:, 6:9] = -100
    for b in batches:
        loss_sum(model, b)[0].mul(0.3).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    tied = TiedGradient.for_model(model)
    assert tied is not None and tied.weight is model.get_output_embeddings().weight
    for b in batches:
        loss_sum(model, b, tied)[0].mul(0.3).backward()
    tied.attach_grad()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-12, atol=1e-12, msg=name)
    model.zero_grad(set_to_none=True)
    tied.reset()
    assert not tied.grad.any() and tied.weight.grad is None


def test_tied_gradient_casts_the_current_weight_after_a_fused_adamw_step():
    """Fused AdamW updates weights without bumping their version counters: the cast must still be current."""
    from tracetune.train.loss import TiedGradient

    model, _ = _tiny("gemma3", torch.float32)
    tied = TiedGradient.for_model(model)
    first = tied.cast(torch.bfloat16).clone()
    tied.weight.grad = torch.ones_like(tied.weight)
    torch.optim.AdamW([tied.weight], lr=0.1, fused=True).step()
    assert torch.equal(tied.cast(torch.bfloat16), tied.weight.detach().bfloat16())
    assert not torch.equal(tied.cast(torch.bfloat16), first)
    assert tied.cast(torch.float32).data_ptr() == tied.weight.data_ptr()  # fp32 compute uses the weight itself


def test_tied_gradient_applies_only_to_a_trainable_tied_matrix():
    from tracetune.train.loss import TiedGradient

    model, _ = _tiny("gemma3", torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)  # LoRA freezes it
    assert TiedGradient.for_model(model) is None
    model, _ = _tiny("llama", torch.float32)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied
    assert TiedGradient.for_model(model) is None
