"""One process per memory allocator, the same training steps: real tokens/s, minor page faults and RSS per step.

tracetune's own pieces (collate, its decoder forward, linear_cross_entropy with TiedGradient, fused AdamW) on
Gemma 3 270M, batch 4, bf16 autocast; each allocator is preloaded into a fresh process.
Run: python bench/allocator_probe.py [--steps 8] [--allocators glibc tcmalloc jemalloc]
Writes bench/results/allocator_probe.jsonl (one line per allocator).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = {"glibc": None, "tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(steps: int) -> dict:
    import torch

    from tracetune import allocator
    from tracetune.config import load_config
    from tracetune.data.batching import collate
    from tracetune.pipeline import load_for_training, load_inputs
    from tracetune.train.step import build_state, train_step

    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["data.max_train_records=200"])
    tokenizer, model, train, _, _ = load_for_training(cfg, load_inputs(cfg))
    state = build_state(cfg, model, torch.device("cpu"), steps + 1)
    rows = []
    for step in range(steps + 1):
        batch = collate(train[4 * step : 4 * step + 4], tokenizer.pad_token_id)
        faults, started = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        train_step(state, [batch], step + 1)
        state.scheduler.step()
        seconds = time.perf_counter() - started
        rows.append(
            {
                "step": step,
                "real_tokens_per_s": int(batch["attention_mask"].sum()) / seconds,
                "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                "rss_mb": round(_rss_mb()),
            }
        )
    timed = rows[1:]  # the first step warms up
    return {
        "allocator": allocator.active(),
        "median_real_tokens_per_s": statistics.median(r["real_tokens_per_s"] for r in timed),
        "median_minor_faults_per_step": statistics.median(r["minor_faults"] for r in timed),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "steps": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--allocators", nargs="+", default=["glibc", "tcmalloc", "jemalloc"])
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps)))
        return
    out = REPO / "bench" / "results" / "allocator_probe.jsonl"
    lines = []
    for name in args.allocators:
        env = {**os.environ, "TRACETUNE_ALLOCATOR": "system", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
        env.pop("LD_PRELOAD", None)
        if LIBRARIES[name]:
            library = ctypes.util.find_library(LIBRARIES[name])
            if library is None:
                print(f"{name}: not installed, skipped")
                continue
            env["LD_PRELOAD"] = library
        command = [sys.executable, __file__, "--worker", "--steps", str(args.steps)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        record = json.loads(result.stdout.strip().splitlines()[-1])
        lines.append(json.dumps(record))
        print(
            f"{name}: ran on {record['allocator']}, {record['median_real_tokens_per_s']:.1f} real tokens/s, "
            f"{record['median_minor_faults_per_step']:.0f} minor faults/step, peak RSS {record['peak_rss_mb']} MB"
        )
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
