"""Dynamic versus static KV cache for batched greedy generation, interleaved (A B A B).

python bench/kv_cache.py --model runs/<run>/final_model --items 25 --tokens 48 --repeats 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tracetune.data.render import render_prompt
from tracetune.data.traces import load_eval_items
from tracetune.models.sources import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="packaged:gemma3-270m")
    parser.add_argument("--items", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "left"
    model = load_model(args.model, tokenizer).to(torch.bfloat16).eval()
    items = load_eval_items(REPO / "data" / "eval.jsonl").records[: args.items]
    prompts = [render_prompt(tokenizer, i.prompt, "") for i in items]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    for _ in range(args.repeats):
        for cache in ("dynamic", "static"):
            started = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    **encoded,
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                    do_sample=False,
                    cache_implementation=None if cache == "dynamic" else "static",
                )
            seconds = time.perf_counter() - started
            print(f"{cache:<8} {len(items) * args.tokens / seconds:7.1f} new tokens/s", flush=True)


if __name__ == "__main__":
    main()
