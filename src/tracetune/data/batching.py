"""Length-bucketed dynamic padding and collation.

Examples are shuffled with a seed per epoch, grouped into windows of 16 batches, sorted by length inside
each window and cut into batches, so each batch pads to a similar length; the batch order is shuffled
again. Attention masks keep padding out of every example's view, so nothing crosses between examples.
"""

from __future__ import annotations

import random

import torch

from tracetune.data.render import Example

IGNORE_INDEX = -100
_WINDOW_BATCHES = 16


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each micro-batch for one epoch, deterministic in (seed, epoch)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * _WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        group = sorted(order[start : start + window], key=lambda i: (lengths[i], i))
        batches.extend(group[k : k + batch_size] for k in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX on prompt and padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, example.num_prompt_tokens : len(ids)] = ids[example.num_prompt_tokens :]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
