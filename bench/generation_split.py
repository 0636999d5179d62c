"""Where one batch of tracetune's greedy generation spends its time: the prefill forwards, the decode forwards,
and everything between them (picking each next token, bookkeeping, dropping finished rows), by timing the
model's forward calls inside `generate_batch`; then argmax versus max(-1).indices on the batch's logits.
Run (as tracetune's evaluation runs, under tcmalloc):
    LD_PRELOAD=libtcmalloc_minimal.so.4 python bench/generation_split.py --model runs/<id>/final_model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tracetune.config import EvalConfig, load_config
from tracetune.data.render import end_of_turn_ids, render_prompt
from tracetune.data.traces import load_eval_items
from tracetune.eval.generate import generate_batch
from tracetune.models.sources import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, tokenizer).to(torch.bfloat16).eval()
    items = load_eval_items(REPO / "data" / "eval.jsonl").records[: args.items]
    instruction = load_config(REPO / "configs" / "quickstart.yaml").data.instruction
    prompts = [render_prompt(tokenizer, i.prompt, instruction) for i in items]
    cfg = EvalConfig(eval_file=None, max_new_tokens=96, batch_size=len(prompts))
    forward, calls = model.forward, []

    def timed_forward(*a, **k):
        started = time.perf_counter()
        out = forward(*a, **k)
        calls.append((tuple(k["input_ids"].shape), time.perf_counter() - started))
        return out

    model.forward = timed_forward
    for _ in range(args.repeats):
        calls.clear()
        started = time.perf_counter()
        generate_batch(model, tokenizer, prompts, cfg, end_of_turn_ids(tokenizer))
        total = time.perf_counter() - started
        prompt_calls = [(shape, seconds) for shape, seconds in calls if shape[1] > 1]  # one per length group
        prefill = sum(seconds for _, seconds in prompt_calls)
        decode = sum(seconds for shape, seconds in calls if shape[1] == 1)
        print(
            f"{len(prompts) / total:.2f} items/s: total {total:.2f} s, prefill {prefill:.2f} s "
            f"{[shape for shape, _ in prompt_calls]}, {len(calls) - len(prompt_calls)} decode forwards {decode:.2f} s, "
            f"between them {total - prefill - decode:.2f} s"
        )
    logits = torch.randn(len(prompts), model.config.vocab_size).to(torch.bfloat16)
    for name, pick in (("argmax(-1)", lambda: logits.argmax(-1)), ("max(-1).indices", lambda: logits.max(-1).indices)):
        pick()
        started = time.perf_counter()
        for _ in range(20):
            pick()
        print(f"{name} on {tuple(logits.shape)} bf16 logits: {(time.perf_counter() - started) / 20 * 1000:.1f} ms")


if __name__ == "__main__":
    main()
