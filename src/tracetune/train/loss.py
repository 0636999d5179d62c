"""Causal-LM loss computed only where it counts.

The LM head of a 262K-vocabulary model is most of its FLOPs, so we run the decoder, pick the hidden states
whose next token is a loss token, and project only those. The result is a *sum* over loss tokens; the loop
divides by the token count of the whole optimizer step, so accumulation equals one large batch.

The projection and the cross-entropy are one autograd function (`linear_cross_entropy`): it takes the
logits a chunk of rows at a time and keeps only their gradient, in the compute dtype, for the backward,
instead of autograd's fp32 logits, log-softmax and its gradient (three fp32 copies of a tokens x vocabulary
matrix; at 256 loss tokens and 262K entries, 270 MB each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tracetune.data.batching import IGNORE_INDEX


def unwrap_model(model):
    """The transformers model inside a peft or DDP wrapper (LoRA layers stay injected)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "module", model)


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over loss positions, and how many there were."""
    inner = unwrap_model(model)
    hidden = inner.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    selected, wanted, count = hidden[:, :-1][mask], targets[mask], int(mask.sum())
    head = inner.get_output_embeddings()
    if head.bias is not None:  # no Gemma or Llama-family model has one; keep autograd's path for any that does
        return F.cross_entropy(head(selected).float(), wanted, reduction="sum"), count
    cap = getattr(inner.config, "final_logit_softcapping", None) or 0.0
    return linear_cross_entropy(selected, head.weight, wanted, cap), count


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0):
    """Sum over rows of cross_entropy(softcap(hidden @ weight.T), targets), computed as autocast would (the
    matmuls in its dtype, softmax in fp32), with the LM head's logits never held whole in fp32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return _LinearCrossEntropy.apply(hidden, weight, targets, float(softcap), dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    # fp32 logits per chunk: 2^25 entries (128 MB, 128 rows of a 262K vocabulary) on CPU. Every chunk reads
    # the whole head, so a GPU gets 2^28 (1 GB, 1024 rows): matmuls that stay compute-bound on an H100.
    CHUNK_ENTRIES = 1 << 25
    CUDA_CHUNK_ENTRIES = 1 << 28

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            budget = _LinearCrossEntropy.CUDA_CHUNK_ENTRIES if h.is_cuda else _LinearCrossEntropy.CHUNK_ENTRIES
            rows = max(1, budget // w.shape[0])
            grad_logits = torch.empty(h.shape[0], w.shape[0], dtype=dtype, device=h.device)
            softmax_dtype = torch.promote_types(dtype, torch.float32)
            total = torch.zeros((), dtype=softmax_dtype, device=h.device)
            for start in range(0, h.shape[0], rows):
                logits = (h[start : start + rows] @ w.T).to(softmax_dtype)
                if softcap:
                    capped = torch.tanh(logits / softcap)
                    logits = capped * softcap
                target = targets[start : start + rows, None]
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                total += (lse - logits.gather(1, target)).sum()
                grad = logits.sub_(lse).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, target, grad.new_full(target.shape, -1.0))
                if softcap:
                    grad.mul_(1 - capped * capped)
                grad_logits[start : start + rows] = grad
        ctx.save_for_backward(h, w, grad_logits)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, w, grad_logits = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_weight = None
        # The matmul results are fresh tensors, so the scale by the incoming gradient can be in place.
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ w).to(hidden_dtype).mul_(grad_total)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.T @ h).to(weight_dtype).mul_(grad_total)
        return grad_hidden, grad_weight, None, None, None


class CausalLMLoss(torch.nn.Module):
    """The model with `loss_sum` as its forward, so DDP and FSDP see the one call they must wrap.

    Called with labels: the summed loss over loss positions. Without: the model's own output (full
    logits), for the checkpoint probe.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, labels=None):
        if labels is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        return loss_sum(self.model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})[0]


def num_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
