"""A fixed probe batch whose outputs are stored with each checkpoint, so a reload can be checked from files."""

from __future__ import annotations

import torch


@torch.no_grad()
def probe_outputs(model, input_ids: list[list[int]], exact: bool = True) -> dict:
    """Per-position argmax, max logit and logsumexp of the model on `input_ids` (equal-length rows), in fp32.

    The device is recorded: a reload on the same device must reproduce the numbers exactly, while another
    device's kernels (CUDA versus CPU) round differently. `exact=False` says a plain reload cannot reproduce
    them bit for bit even there (an FSDP model computing in bf16 over sharded fp32 weights).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor(input_ids, dtype=torch.long, device=device)
    logits = model(input_ids=ids).logits.float()
    model.train(was_training)
    return {
        "device": device.type,
        "exact": exact,
        "input_ids": input_ids,
        "argmax": logits.argmax(-1).tolist(),
        "max": logits.max(-1).values.tolist(),
        "logsumexp": torch.logsumexp(logits, -1).tolist(),
    }


def probe_difference(expected: dict, actual: dict, compare_argmax: bool = True) -> float:
    """Largest absolute difference between two probes; inf when any argmax differs (if compared).

    Across devices a near-tie may flip an argmax while the logits agree to rounding, so callers comparing
    across devices pass compare_argmax=False and rely on the max logit and logsumexp.
    """
    if compare_argmax and expected["argmax"] != actual["argmax"]:
        return float("inf")
    diffs = [
        abs(a - b)
        for key in ("max", "logsumexp")
        for row_a, row_b in zip(expected[key], actual[key], strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    ]
    return max(diffs, default=0.0)
