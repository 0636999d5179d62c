"""The step checker on synthesised traces: how many one-number corruptions it finds, false alarms on the clean
traces, and microseconds per item (best of 3 passes).
Run: python bench/step_checker.py [--num 2000] [--seed 11]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from tracetune.data.synth import corrupt_one_number, generate
from tracetune.eval.steps import check_steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    records = generate(args.num, seed=args.seed)
    rng = random.Random(0)
    clean = [([s["content"] for s in r["steps"]], r["final_answer"]) for r in records]
    corrupted = [corrupt_one_number(r, rng) for r in records]
    cases = clean + corrupted
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        results = [check_steps(steps, answer) for steps, answer in cases]
        best = min(best, time.perf_counter() - started)
    false_alarms = sum(not r.work_valid for r in results[: len(clean)])
    found = sum(not r.work_valid for r in results[len(clean) :])
    print(
        json.dumps(
            {
                "traces": len(records),
                "corruptions_found": found / len(records),
                "false_alarms_on_clean": false_alarms,
                "microseconds_per_item": round(1e6 * best / len(cases), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
