"""What `auto` precision chooses between on this CPU: greedy generation of the same eval items by the same model in
fp32 and in bf16, interleaved repeats, through `generate_batch` (the evaluation's generator). On a CPU with bf16
instructions (AVX-512 BF16, AMX) bf16 is the faster; on an AVX2-only CPU it is emulated. Writes one JSON line
per measurement and a summary to --out.

Run: python bench/cpu_precision.py [--items 16] [--new-tokens 32] [--repeats 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from harness import interleave

from tracetune.chat import end_of_turn_ids
from tracetune.config import load_config
from tracetune.data.render import render_prompt
from tracetune.data.traces import load_eval_items
from tracetune.dist import cpu_has_bf16
from tracetune.eval.generate import generate_batch
from tracetune.evidence.env import cpu_model
from tracetune.models.sources import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu_precision.json")
    args = parser.parse_args()
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"eval.max_new_tokens={args.new_tokens}"])
    tokenizer = load_tokenizer(cfg.model.source)
    items = load_eval_items(cfg.eval.eval_file).records[: args.items]
    prompts = [render_prompt(tokenizer, item.prompt, cfg.data.instruction) for item in items]
    stops = end_of_turn_ids(tokenizer)
    base = load_model(cfg.model.source, tokenizer, cfg.seed).eval()
    models = {"fp32": base, "bf16": load_model(cfg.model.source, tokenizer, cfg.seed).to(torch.bfloat16).eval()}
    generate_batch(base, tokenizer, prompts[:2], cfg.eval, stops)  # warm-up: first-call costs

    def one(name: str) -> dict:
        started = time.perf_counter()
        out = generate_batch(models[name], tokenizer, prompts, cfg.eval, stops)
        return {"seconds": time.perf_counter() - started, "completions": [g.completion for g in out]}

    runs = interleave(tuple(models), args.repeats, one)
    seconds = {name: [run["seconds"] for run in repeats] for name, repeats in runs.items()}
    completions = {name: repeats[-1]["completions"] for name, repeats in runs.items()}
    median = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "cpu": cpu_model(),
        "cpu_has_bf16": cpu_has_bf16(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "items": args.items,
        "new_tokens": args.new_tokens,
        "seconds": seconds,
        "median_seconds": median,
        "bf16_over_fp32_time": median["bf16"] / median["fp32"],
        "identical_completions": sum(a == b for a, b in zip(completions["fp32"], completions["bf16"], strict=True)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
