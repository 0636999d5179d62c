"""What batch-invariant generation costs and buys, two commits side by side in one invocation.

Each commit runs in its own git worktree and process, A B A B ... (bench/ab_commits.py's harness), with this
file's worker measuring both: the packaged base model at one precision, greedy generation of the quickstart's
evaluation (one batch of `--items` prompts, 96 new tokens) and a 4-sample sampled generation of `--sampled-items`
prompts, the same prompts again in batches of 7 (do the answers move with the batch?), then the generation
probe's verdict (batched against one-at-a-time logits) on 20 prompts.

    python bench/invariance_cost.py --base 61a0cce --precision fp32 --repeats 2

Writes bench/results/<out>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def worker(args) -> None:
    import torch

    from tracetune.config import EvalConfig, load_config
    from tracetune.data.render import end_of_turn_ids, render_prompt
    from tracetune.data.traces import load_eval_items
    from tracetune.eval.generate import generate_batch
    from tracetune.eval.invariance import probe_generation
    from tracetune.models.sources import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.source)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = load_model(args.source, tokenizer).to(dtype).eval()
    tree = Path.cwd()  # the commit's own worktree: its configs are the ones its code reads
    items = load_eval_items(tree / "data" / "eval.jsonl").records
    instruction = load_config(tree / "configs" / "quickstart.yaml").data.instruction
    prompts = [render_prompt(tokenizer, i.prompt, instruction) for i in items]
    stops = end_of_turn_ids(tokenizer)
    greedy = EvalConfig(eval_file=None, max_new_tokens=96, batch_size=args.items)
    started = time.perf_counter()
    out = generate_batch(model, tokenizer, prompts[: args.items], greedy, stops)
    greedy_s = time.perf_counter() - started
    # The same prompts in batches of 7: another batch composition for every prompt; identical answers are what
    # batch invariance promises.
    chunks = [prompts[k : min(k + 7, args.items)] for k in range(0, args.items, 7)]
    small = [g for chunk in chunks for g in generate_batch(model, tokenizer, chunk, greedy, stops)]
    sampled_prompts = [p for p in prompts[: args.sampled_items] for _ in range(4)]
    sampled = greedy.model_copy(update={"do_sample": True, "temperature": 0.8, "top_p": 1.0})
    started = time.perf_counter()
    generate_batch(model, tokenizer, sampled_prompts, sampled, stops, seeds=list(range(len(sampled_prompts))))
    sampled_s = time.perf_counter() - started
    probe = probe_generation(model, tokenizer, prompts[:20])
    record = {
        "greedy_s": greedy_s,
        "greedy_new_tokens": sum(g.num_new_tokens for g in out),
        "sampled_s": sampled_s,
        "identical_completions_batch_50_vs_7": sum(a == b for a, b in zip(out, small, strict=True)) / len(out),
        "batch_invariant": probe["batch_invariant"],
        "max_abs_logit_difference": probe["max_abs_logit_difference"],
        "completions": [g.completion for g in out],
    }
    print(json.dumps(record))


def main() -> None:
    from ab_commits import _run_worker, _worktree

    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["generate"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help="the commit to compare with the working tree's HEAD")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--source", default="packaged:gemma3-270m")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--sampled-items", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="invariance_cost")
    args, _ = parser.parse_known_args()
    if args.worker:
        worker(args)
        return
    extra = ["--source", args.source, "--precision", args.precision, "--items", str(args.items)]
    extra += ["--sampled-items", str(args.sampled_items)]
    runs: dict[str, list[dict]] = {args.base: [], args.head: []}
    with tempfile.TemporaryDirectory() as root:
        trees = {rev: _worktree(rev, Path(root)) for rev in runs}
        for _ in range(args.repeats):
            for rev, tree in trees.items():
                runs[rev].append(_run_worker(tree, Path(__file__).resolve(), "generate", extra))
    summary = {
        rev: {
            "greedy_s": [round(r["greedy_s"], 2) for r in rs],
            "greedy_s_median": statistics.median(r["greedy_s"] for r in rs),
            "sampled_s": [round(r["sampled_s"], 2) for r in rs],
            "sampled_s_median": statistics.median(r["sampled_s"] for r in rs),
            "identical_completions_batch_50_vs_7": [r["identical_completions_batch_50_vs_7"] for r in rs],
            "batch_invariant": [r["batch_invariant"] for r in rs],
            "max_abs_logit_difference": [r["max_abs_logit_difference"] for r in rs],
        }
        for rev, rs in runs.items()
    }
    base, head = (runs[rev][0]["completions"] for rev in (args.base, args.head))
    result = {
        "args": vars(args),
        "commits": summary,
        "head_over_base_greedy": summary[args.head]["greedy_s_median"] / summary[args.base]["greedy_s_median"],
        "head_over_base_sampled": summary[args.head]["sampled_s_median"] / summary[args.base]["sampled_s_median"],
        "identical_completions_head_vs_base": sum(a == b for a, b in zip(base, head, strict=True)) / len(base),
    }
    (REPO / "bench" / "results" / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
