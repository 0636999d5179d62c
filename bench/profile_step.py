"""Where one optimizer step's time goes (Gemma 3 270M, batch 4, bf16 autocast): the loop's own `train_step`
timed whole, split by forward hooks into decoder forward, LM head and loss, and backward + clip + optimizer;
with --ops, torch.profiler's top operators of one more step. Preload tcmalloc as tracetune does
(LD_PRELOAD=libtcmalloc_minimal.so.4) to profile what `tracetune run` runs.
Run: python bench/profile_step.py [--precision fp32] [--steps 4] [--ops]"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tracetune.config import load_config
from tracetune.data.batching import collate
from tracetune.pipeline import load_for_training, load_inputs
from tracetune.train.loss import unwrap_model
from tracetune.train.step import build_state, train_step

REPO = Path(__file__).resolve().parents[1]


def _timed_forward(module, marks: dict, name: str) -> None:
    """Record when `module`'s forward starts and ends under marks[name]."""
    module.register_forward_pre_hook(lambda *_: marks.__setitem__(f"{name}_start", time.perf_counter()))
    module.register_forward_hook(lambda *_: marks.__setitem__(f"{name}_end", time.perf_counter()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="bf16-autocast")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--source", default="packaged:gemma3-270m")
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's top operators")
    args = parser.parse_args()
    overrides = [f"model.source={args.source}", "data.max_train_records=64", f"train.precision={args.precision}"]
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    tokenizer, model, train, _, _ = load_for_training(cfg, load_inputs(cfg))
    state = build_state(cfg, model, torch.device("cpu"), args.steps + 2)
    marks: dict[str, float] = {}
    _timed_forward(unwrap_model(state.model).get_decoder(), marks, "decoder")
    _timed_forward(state.net, marks, "net")
    totals: dict[str, float] = {}
    for step in range(args.steps + 1):
        batch = collate(train[4 * step : 4 * step + 4], tokenizer.pad_token_id)
        started = time.perf_counter()
        train_step(state, [batch], step + 1)
        ended = time.perf_counter()
        state.scheduler.step()
        if step == 0:
            continue  # warmup
        phases = {
            "decoder forward": marks["decoder_end"] - marks["decoder_start"],
            "head + loss": (marks["net_end"] - marks["net_start"]) - (marks["decoder_end"] - marks["decoder_start"]),
            "backward + clip + optimizer": ended - marks["net_end"],
            "before the forward": marks["net_start"] - started,
        }
        for name, seconds in phases.items():
            totals[name] = totals.get(name, 0.0) + seconds
    if args.ops:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        batch = collate(train[:4], tokenizer.pad_token_id)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            train_step(state, [batch], args.steps + 2)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))
    total = sum(totals.values())
    for name, seconds in totals.items():
        print(f"{name:<28} {seconds / args.steps:6.2f} s/step  {100 * seconds / total:5.1f}%")
    print(f"{'total':<28} {total / args.steps:6.2f} s/step")


if __name__ == "__main__":
    main()
