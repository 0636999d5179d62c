"""Causal-LM loss computed only where it counts.

The LM head of a 262K-vocabulary model is most of its FLOPs, so we run the decoder, pick the hidden states
whose next token is a loss token, and project only those. The result is a *sum* over loss tokens; the loop
divides by the token count of the whole optimizer step, so accumulation equals one large batch.
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
    logits = inner.get_output_embeddings()(hidden[:, :-1][mask]).float()
    cap = getattr(inner.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets[mask], reduction="sum"), int(mask.sum())


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
