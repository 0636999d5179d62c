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

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tracetune.data.batching import IGNORE_INDEX


def unwrap_model(model):
    """The transformers model inside a peft or DDP wrapper (LoRA layers stay injected)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "module", model)


POLICY_KEYS = ("advantages", "old_logprobs", "ref_logprobs")  # per-token tensors shaped like labels


@dataclass
class PolicySettings:
    """The clipped-surrogate settings of a policy-gradient loss, and the sums it reports since `reset`."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    kl_coef: float = 0.0
    temperature: float = 1.0  # the samples' temperature: log-probabilities are of softmax(logits / temperature)
    stats: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.reset()

    def reset(self) -> dict:
        """The sums since the last reset (tokens, clipped tokens, KL, entropy), and a fresh start."""
        stats, self.stats = self.stats, {"tokens": 0.0, "clipped": 0.0, "kl": 0.0, "entropy": 0.0}
        return stats


@dataclass
class PolicyTerms:
    """One micro-batch's per-loss-token tensors (in loss-position order) for `PolicySettings`' loss."""

    settings: PolicySettings
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    def rows(self, start: int, logp: torch.Tensor, entropy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per row, -d loss / d logp per row) for rows start.. of the loss positions, given their logp.

        loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + kl_coef * k3, with r = exp(logp - old) (1 when
        there is no old: one update per sample, the ratio's value and gradient are those of r at 1) and
        k3 = exp(ref - logp) - (ref - logp) - 1. The gradient of a clipped row's surrogate is zero.
        """
        s, end = self.settings, start + logp.shape[0]
        advantage = self.advantages[start:end].to(logp.dtype)
        ratio = torch.ones_like(logp) if self.old_logprobs is None else (logp - self.old_logprobs[start:end]).exp()
        clipped = ((advantage > 0) & (ratio > 1 + s.epsilon_high)) | ((advantage < 0) & (ratio < 1 - s.epsilon_low))
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - s.epsilon_low, 1 + s.epsilon_high) * advantage)
        loss, weight = -surrogate, torch.where(clipped, 0.0, ratio * advantage)
        if s.kl_coef and self.ref_logprobs is not None:
            delta = self.ref_logprobs[start:end].to(logp.dtype) - logp
            loss = loss + s.kl_coef * (delta.exp() - delta - 1)
            weight = weight - s.kl_coef * (1 - delta.exp())
            s.stats["kl"] += float((delta.exp() - delta - 1).sum())
        s.stats["tokens"] += logp.shape[0]
        s.stats["clipped"] += float(clipped.sum())
        s.stats["entropy"] += float(entropy.sum())
        return loss, weight


def loss_sum(
    model, batch: dict[str, torch.Tensor], tied: TiedGradient | None = None, policy: PolicySettings | None = None
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over loss positions, and how many there were. With `tied`, the tied
    embedding/head matrix's gradient goes into tied.grad instead of through autograd. With `policy` and
    `batch["advantages"]`, the sum is of the policy loss instead (`PolicyTerms.rows`)."""
    inner = unwrap_model(model)
    ids = batch["input_ids"]
    inputs = {"input_ids": ids} if tied is None else {"inputs_embeds": tied.embed(ids)}
    hidden = inner.get_decoder()(**inputs, attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    selected, wanted, count = hidden[:, :-1][mask], targets[mask], int(mask.sum())
    terms = None
    if policy is not None and batch.get("advantages") is not None:
        per_token = {k: batch[k][:, 1:][mask] if batch.get(k) is not None else None for k in POLICY_KEYS}
        terms = PolicyTerms(policy, **per_token)
    head = inner.get_output_embeddings()
    if head.bias is not None:  # no Gemma or Llama-family model has one; keep autograd's path for any that does
        assert terms is None, "policy losses need a head without bias"
        return F.cross_entropy(head(selected).float(), wanted, reduction="sum"), count
    cap = getattr(inner.config, "final_logit_softcapping", None) or 0.0
    return linear_cross_entropy(selected, head.weight, wanted, cap, tied, terms), count


@torch.no_grad()
def token_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log p(token) at every loss position (labels != IGNORE_INDEX), shaped like labels (0 elsewhere), of the
    distribution the tokens were sampled from, softmax(logits / temperature); the head runs a chunk of rows at
    a time, as in training."""
    inner = unwrap_model(model)
    hidden = inner.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    selected, wanted = hidden[:, :-1][mask], targets[mask]
    head = inner.get_output_embeddings()
    cap = getattr(inner.config, "final_logit_softcapping", None) or 0.0
    rows = max(1, _LinearCrossEntropy.CHUNK_ENTRIES // head.weight.shape[0])
    parts = []
    for start in range(0, selected.shape[0], rows):
        logits = head(selected[start : start + rows]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        if temperature != 1.0:
            logits = logits / temperature
        parts.append(logits.log_softmax(-1).gather(1, wanted[start : start + rows, None]).squeeze(1))
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    out[mask] = torch.cat(parts) if parts else out[mask]
    return torch.cat([torch.zeros_like(out[:, :1]), out], dim=1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float = 0.0,
    tied: TiedGradient | None = None,
    policy: PolicyTerms | None = None,
):
    """Sum over rows of cross_entropy(softcap(hidden @ weight.T), targets), computed as autocast would (the
    matmuls in its dtype, softmax in fp32), with the LM head's logits never held whole in fp32. With `tied`
    (whose weight is `weight`), the weight's gradient is added into tied.grad. With `policy`, each row's
    term is its policy loss instead, and its gradient row is scaled by -d loss / d logp (a row's cross-entropy
    gradient is -d logp / d logits)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return _LinearCrossEntropy.apply(hidden, weight, targets, float(softcap), dtype, tied, policy)


class _LinearCrossEntropy(torch.autograd.Function):
    # fp32 logits per chunk: 2^25 entries (128 MB, 128 rows of a 262K vocabulary) on CPU. Every chunk reads
    # the whole head, so a GPU gets 2^28 (1 GB, 1024 rows): matmuls that stay compute-bound on an H100.
    CHUNK_ENTRIES = 1 << 25
    CUDA_CHUNK_ENTRIES = 1 << 28
    # Vocabulary rows of the head's gradient computed at a time into TiedGradient's buffer (20 MB at width 640).
    TIED_GRAD_ROWS = 1 << 14

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, dtype, tied, policy):
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), (tied.cast(dtype) if tied else weight.to(dtype))
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
                temperature = policy.settings.temperature if policy is not None else 1.0
                if temperature != 1.0:  # the policy's log-probabilities are those of the tempered samples
                    logits.div_(temperature)
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                row_weight = None
                if policy is None:
                    total += (lse - logits.gather(1, target)).sum()
                else:
                    logp = (logits.gather(1, target) - lse).squeeze(1)
                    entropy = lse.squeeze(1) - (torch.softmax(logits, -1) * logits).sum(-1)
                    row_loss, row_weight = policy.rows(start, logp, entropy)
                    total += row_loss.sum()
                grad = logits.sub_(lse).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, target, grad.new_full(target.shape, -1.0))
                if temperature != 1.0:
                    grad.div_(temperature)
                if softcap:
                    grad.mul_(1 - capped * capped)
                if row_weight is not None:
                    grad.mul_(row_weight[:, None])
                grad_logits[start : start + rows] = grad
        ctx.save_for_backward(h, w, grad_logits)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.tied = tied
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, w, grad_logits = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_weight = None
        # The matmul results are fresh tensors, so the scale by the incoming gradient can be in place.
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ w).to(hidden_dtype).mul_(grad_total)
        if ctx.tied is not None:  # into the kept buffer, a slice of the vocabulary at a time; autograd sees none
            step = _LinearCrossEntropy.TIED_GRAD_ROWS
            for start in range(0, w.shape[0], step):
                part = grad_logits[:, start : start + step].T @ h
                ctx.tied.grad[start : start + step].addcmul_(part, grad_total)
        elif ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.T @ h).to(weight_dtype).mul_(grad_total)
        return grad_hidden, grad_weight, None, None, None, None, None


class TiedGradient:
    """The gradient of a tied input-embedding/LM-head matrix, accumulated in place into one buffer.

    Through autograd, each micro-step creates that matrix's gradient four times over (the embedding's dense
    gradient, the head's in bf16 and in fp32, their sum), 262K x 640 each for Gemma 3 270M, plus a bf16 cast
    of the weight: gigabytes allocated, filled and freed per step. Here the embedding lookup's backward
    index-adds into `grad`, the head's backward adds into it a slice of the vocabulary at a time, and the
    weight's bf16 cast goes into a kept buffer. The loop hands `grad` to the optimizer
    (`attach_grad`) and zeroes it after the step (`reset`). One CPU process only (`fit` decides): DDP and
    FSDP reduce gradients from autograd's hooks, which this path bypasses.
    """

    def __init__(self, model):
        self.embedding = unwrap_model(model).get_input_embeddings()
        self.weight = self.embedding.weight
        self._grad: torch.Tensor | None = None  # allocated at the first backward
        self._cast: torch.Tensor | None = None

    @staticmethod
    def for_model(model) -> TiedGradient | None:
        """One for `model` when it has a trainable tied matrix, a head without bias and an embedding this
        class reproduces exactly (plain, or Gemma's scaled one; checked on a probe); otherwise None."""
        from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

        inner = unwrap_model(model)
        embedding, head = inner.get_input_embeddings(), inner.get_output_embeddings()
        if head is None or head.weight is not embedding.weight or head.bias is not None:
            return None
        known = type(embedding).forward in (torch.nn.Embedding.forward, Gemma3TextScaledWordEmbedding.forward)
        if not embedding.weight.requires_grad or not known or embedding.max_norm is not None:
            return None
        tied = TiedGradient(model)
        probe = torch.arange(min(8, embedding.num_embeddings), device=embedding.weight.device)[None]
        with torch.no_grad():
            return tied if torch.equal(tied.embed(probe), embedding(probe)) else None

    @property
    def grad(self) -> torch.Tensor:
        if self._grad is None:
            self._grad = torch.zeros_like(self.weight)
        return self._grad

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.embedding, "embed_scale", None)  # Gemma scales its embeddings by sqrt(hidden)
        out = _EmbeddingIntoBuffer.apply(input_ids, self.weight, self)
        return out if scale is None else out * scale.to(self.weight.dtype)

    def cast(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`, cast at every forward into a kept buffer. (Not cached across forwards: fused
        AdamW updates weights in place without bumping their version counters, so staleness is undetectable.)"""
        if dtype == self.weight.dtype:
            return self.weight.detach()
        if self._cast is None or self._cast.dtype != dtype:
            self._cast = torch.empty_like(self.weight, dtype=dtype)
        return self._cast.copy_(self.weight.detach())

    def attach_grad(self) -> None:
        """After the step's backward passes: the weight's .grad is the buffer (autograd left it None)."""
        assert self.weight.grad is None, "the tied weight received an autograd gradient as well"
        self.weight.grad = self.grad

    def reset(self) -> None:
        """After the optimizer step and zero_grad(set_to_none=True): an empty buffer for the next step."""
        self.grad.zero_()


class _EmbeddingIntoBuffer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, weight, tied):
        ctx.save_for_backward(input_ids)
        ctx.tied = tied
        return F.embedding(input_ids, weight, tied.embedding.padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        ids, rows = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])
        padding = ctx.tied.embedding.padding_idx
        if padding is not None:  # nn.Embedding's padding row gets no gradient
            keep = ids != padding
            ids, rows = ids[keep], rows[keep]
        ctx.tied.grad.index_add_(0, ids, rows.to(ctx.tied.grad.dtype))
        return None, None, None


class CausalLMLoss(torch.nn.Module):
    """The model with `loss_sum` as its forward, so DDP and FSDP see the one call they must wrap.

    Called with labels: the summed loss over loss positions. Without: the model's own output (full
    logits), for the checkpoint probe.
    """

    def __init__(self, model, tied: TiedGradient | None = None, policy: PolicySettings | None = None):
        super().__init__()
        self.model = model
        self.tied = tied
        self.policy = policy  # set: batches that carry advantages get the policy loss (rl/grpo.py)

    def forward(self, input_ids, attention_mask=None, labels=None, **policy_tensors):
        if labels is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        scale = policy_tensors.pop("loss_scale", None)  # a batch's weight in the step (GRPO's SFT anchor)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **policy_tensors}
        total = loss_sum(self.model, batch, self.tied, self.policy)[0]
        return total if scale is None else total * scale.to(total.dtype)


def num_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
