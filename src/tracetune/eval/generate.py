"""Batched generation with a KV cache and left padding, stopping each sequence at end-of-turn/EOS or a stop string."""

from __future__ import annotations

import inspect
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
    with torch.inference_mode():
        if cfg.do_sample or cfg.stop_strings:
            rows = _generate_hf(model, tokenizer, encoded, cfg, stop_ids)
        else:
            rows = greedy_compacting(
                model, encoded["input_ids"], encoded["attention_mask"], cfg.max_new_tokens, stop_ids
            )
    results = []
    for row in rows:
        ids, stopped = _cut(row, set(stop_ids), tokenizer.pad_token_id)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        reason = "eos" if stopped else "length"
        for stop in cfg.stop_strings:
            if stop in text:
                text, reason = text[: text.index(stop)], "stop"
        results.append(Generation(text.strip(), len(ids), reason))
    return results


def _generate_hf(model, tokenizer, encoded, cfg: EvalConfig, stop_ids: list[int]) -> list[list[int]]:
    """transformers' generate: sampling and stop strings."""
    options = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, eos_token_id=stop_ids)
    options["pad_token_id"] = tokenizer.pad_token_id
    if cfg.do_sample:
        options.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    if cfg.stop_strings:
        options.update(stop_strings=cfg.stop_strings, tokenizer=tokenizer)
    output = model.generate(**encoded, **options)
    return output[:, encoded["input_ids"].shape[1] :].tolist()


def greedy_compacting(model, input_ids, attention_mask, max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
    """Greedy decoding with a KV cache that drops each sequence from the batch once it emits a stop id.

    transformers' generate keeps finished rows in the batch until the longest one ends, so a batch costs its
    longest completion times its size; here a step costs only the rows still running. Positions follow the
    left-padded attention mask exactly as generate computes them, so the tokens are generate's (tested).
    Returns each row's new token ids, the stop id included.
    """
    from transformers import DynamicCache

    # transformers renamed past_key_values to cache (the old name warns, then goes in 5.40).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {name: DynamicCache(config=model.config)}
    stops = torch.tensor(stop_ids, device=input_ids.device)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **cache,
    ).logits
    running = torch.arange(input_ids.shape[0], device=input_ids.device)  # original row of each batch row
    new_ids: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    next_position = positions[:, -1] + 1
    for step in range(max_new_tokens):
        # max's indices follow argmax's rule (the first maximum); on bf16 CPU logits it is 4x faster (23.8 versus
        # 5.9 ms at 50 x 262K), about 8% of a batch's generation time.
        tokens = logits[:, -1].max(-1).indices
        for row, token in zip(running.tolist(), tokens.tolist(), strict=True):
            new_ids[row].append(token)
        keep = ~torch.isin(tokens, stops)
        if step == max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():
            cache[name].batch_select_indices(keep.nonzero().squeeze(1))
            running, tokens, attention_mask, next_position = (
                running[keep],
                tokens[keep],
                attention_mask[keep],
                next_position[keep],
            )
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=next_position[:, None],
            use_cache=True,
            **cache,
        ).logits
        next_position = next_position + 1
    return new_ids


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started
