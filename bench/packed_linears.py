"""F.linear versus the same product on a weight packed once for oneDNN (what `packed_linears` in
src/tracetune/eval/generate.py runs during generation), for Gemma 3 270M's linear shapes in bf16 at the row
counts generation uses: interleaved A B A B, median ms per call, and whether the outputs are bitwise equal.
Run (as tracetune's evaluation runs, under tcmalloc):
    LD_PRELOAD=libtcmalloc_minimal.so.4 python bench/packed_linears.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from tracetune.eval.generate import _packed_forward

# (out_features, in_features) of Gemma 3 270M: the 262K-vocabulary LM head, MLP gate/up and down, q, k/v.
SHAPES = [(262144, 640), (2048, 640), (640, 2048), (1024, 640), (256, 640)]


def _ms(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 16, 50])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| weight (out x in) | rows | F.linear ms | packed ms | ratio | bitwise equal |")
    print("|---|---|---|---|---|---|")
    for out_features, in_features in SHAPES:
        weight = (torch.randn(out_features, in_features) * in_features**-0.5).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        calls = 5 if out_features > 100_000 else 200
        for rows in args.rows:
            x = torch.randn(rows, in_features).bfloat16()
            ways = {"plain": partial(F.linear, x, weight), "packed": partial(_packed_forward, packed, None, x)}
            equal = torch.equal(ways["plain"](), ways["packed"]())
            times = {name: [] for name in ways}
            for _ in range(args.repeats):  # interleaved A B A B ...
                for name, way in ways.items():
                    times[name].append(_ms(way, calls))
            plain, fast = (statistics.median(times[name]) for name in ways)
            print(
                f"| {out_features} x {in_features} | {rows} | {plain:.3f} | {fast:.3f} | {plain / fast:.2f}x | {equal} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
