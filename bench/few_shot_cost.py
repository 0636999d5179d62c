"""What the few-shot baseline costs next to a zero-shot evaluation of the same items, and what the cached prefix
saves: the base model evaluated zero-shot, few-shot with the demonstrations' KV cache computed once (as
`tracetune run` does), and few-shot with every prompt carrying its demonstrations; interleaved repeats, each
through `generate_predictions` into a fresh directory. Accuracy and verified accuracy come with each.
Run (as tracetune's evaluation runs, under tcmalloc):
    LD_PRELOAD=libtcmalloc_minimal.so.4 python bench/few_shot_cost.py [--items 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tracetune.config import load_config
from tracetune.eval import evaluate, scoring
from tracetune.eval.baselines import build_few_shot
from tracetune.models.sources import is_chat_model, load_model, load_tokenizer
from tracetune.pipeline import load_inputs

REPO = Path(__file__).resolve().parents[1]


def _evaluate(model, tokenizer, items, cfg, few_shot) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        evaluate.generate_predictions(model, tokenizer, items, cfg.eval, cfg.data.instruction, out, cfg.seed, few_shot)
        seconds = time.perf_counter() - started
        scores = scoring.write_scores(out, items, "base")
    return {
        "seconds": seconds,
        "accuracy": scores["accuracy"],
        "verified_accuracy": scores["verified_accuracy"],
        "new_tokens": scores["throughput"]["num_new_tokens"],
        "truncation_rate": scores["format"]["truncation_rate"],
    }


class _WithoutPrefix:
    """The same few-shot prompt with the demonstrations inside every question: no shared prefix to cache."""

    def __init__(self, shot):
        self._shot = shot
        self.stop_strings = shot.stop_strings
        self.prefix = ""

    def render(self, tokenizer, prompt):
        return self._shot.prefix + self._shot.render(tokenizer, prompt)

    def evidence(self):
        return self._shot.evidence()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "few_shot_cost.json"))
    args = parser.parse_args()
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"eval.max_items={args.items}"])
    source = cfg.model.source
    tokenizer = load_tokenizer(source)
    model = load_model(source, tokenizer).to(torch.bfloat16).eval()
    inputs = load_inputs(cfg)  # the demonstrations `tracetune run` draws from: the training split
    items, train = inputs.eval_items, inputs.train
    fmt = "chat" if is_chat_model(source) else "plain"
    shot = build_few_shot(tokenizer, train, items, cfg.eval.num_shots, cfg.seed, cfg.data.instruction, fmt)
    modes = {"zero_shot": None, "few_shot_cached": shot, "few_shot_uncached": _WithoutPrefix(shot)}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, few_shot in modes.items():
            runs[mode].append(_evaluate(model, tokenizer, items, cfg, few_shot))
            print(mode, json.dumps(runs[mode][-1]), flush=True)
    median = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    per_token = {m: median[m] / statistics.median(r["new_tokens"] for r in rs) for m, rs in runs.items()}
    result = {
        "items": args.items,
        "model": source,
        "format": fmt,
        "num_shots": cfg.eval.num_shots,
        "prefix_tokens": len(tokenizer(shot.prefix, add_special_tokens=False).input_ids),
        "threads": torch.get_num_threads(),
        "runs": runs,
        "median_seconds": median,
        "few_shot_cached_over_zero_shot": median["few_shot_cached"] / median["zero_shot"],
        "few_shot_uncached_over_zero_shot": median["few_shot_uncached"] / median["zero_shot"],
        "seconds_per_new_token": per_token,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
