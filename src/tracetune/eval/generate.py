"""Batched generation with a KV cache and left padding, stopping each sequence at end-of-turn/EOS or a stop string."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tracetune.config import EvalConfig


@dataclass(frozen=True)
class Generation:
    completion: str
    num_new_tokens: int
    finish_reason: str  # eos | stop | length


def _cut(new_ids: list[int], stop_ids: set[int], pad_id: int) -> tuple[list[int], bool]:
    """Tokens before the first stop id, and whether one was found."""
    for n, token in enumerate(new_ids):
        if token in stop_ids:
            return new_ids[:n], True
    while new_ids and new_ids[-1] == pad_id and pad_id not in stop_ids:
        new_ids = new_ids[:-1]
    return new_ids, False


def generate_batch(model, tokenizer, prompts: list[str], cfg: EvalConfig, stop_ids: list[int]) -> list[Generation]:
    """Generate completions for already-rendered prompts (chat template applied) in one batch."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    options = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, eos_token_id=stop_ids)
    options["pad_token_id"] = tokenizer.pad_token_id
    if cfg.do_sample:
        options.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    if cfg.stop_strings:
        options.update(stop_strings=cfg.stop_strings, tokenizer=tokenizer)
    with torch.inference_mode():
        output = model.generate(**encoded, **options)
    results = []
    width = encoded["input_ids"].shape[1]
    for row in output[:, width:].tolist():
        ids, stopped = _cut(row, set(stop_ids), tokenizer.pad_token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        reason = "eos" if stopped else "length"
        for stop in cfg.stop_strings:
            if stop in text:
                text, reason = text[: text.index(stop)], "stop"
        results.append(Generation(text.strip(), len(ids), reason))
    return results


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started
