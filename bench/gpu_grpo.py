"""GRPO steps on the Gemma-2B architecture (random weights): completions generated and trained per second.

Each step is the stage's own pieces (rl/grpo.py): `sample_step` (the evaluation's batched generator, bf16
copy of the policy), `policy_batches`, `learn` (the one `train_step`, bf16 weights with fp32 master weights, as bench/gpu_bench.py).
Random weights never end a turn, so every completion runs to --tokens; every group is trained on
(`drop_zero_variance_groups` off, as a random model's rewards are all zero). The tokenizer is the packaged
Gemma 3 270M's where installed (its 262K vocabulary sizes the head), else the tiny character one.

    python bench/gpu_grpo.py --device cuda --arch gemma-2b --prompts 16 --group 8 --tokens 128 --steps 4
    python bench/gpu_grpo.py --device cpu --arch tiny --prompts 2 --group 2 --tokens 8 --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tracetune.config import load_config
from tracetune.data.traces import load_traces
from tracetune.rl.grpo import learn, policy_batches, sample_step
from tracetune.rl.rollout import Sampler
from tracetune.train.checkpoint import Progress
from tracetune.train.loss import PolicySettings
from tracetune.train.step import build_state


def tokenizer_for(arch: str):
    from tracetune.models.sources import load_tokenizer

    if arch != "tiny":
        try:
            return load_tokenizer("packaged:gemma3-270m")
        except Exception as exc:  # noqa: BLE001 (any failure: fall back and say so)
            print(f"packaged tokenizer unavailable ({type(exc).__name__}); using the tiny one")
    return load_tokenizer("tiny:gemma3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="gemma-2b", choices=["gemma-2b", "tiny"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=16, help="completions per micro-batch in training")
    args = parser.parse_args()
    device = torch.device(args.device)
    tokenizer = tokenizer_for(args.arch)
    from gpu_bench import build  # bench/ is the script's directory

    model, _ = build(args.arch, device, vocab_size=len(tokenizer))
    cfg = load_config(
        None,
        [
            f"train.device={device.type}", "train.precision=bf16-weights", "train.warmup_steps=0",
            f"train.batch_size={args.micro_batch}", "eval.precision=bf16", "eval.eval_file=null",
            f"grpo.prompts_per_step={args.prompts}", f"grpo.group_size={args.group}",
            f"grpo.sampling.max_new_tokens={args.tokens}", f"grpo.sampling.batch_size={args.prompts * args.group}",
            "grpo.drop_zero_variance_groups=false", "grpo.lr=1e-6",
        ],
    )  # fmt: skip
    train = load_traces("data/train.jsonl").records
    policy = PolicySettings()
    state = build_state(cfg, model, device, args.warmup + args.steps, policy)
    sampler = Sampler(state.model, tokenizer, cfg)
    end_id = tokenizer.eos_token_id
    rows = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        groups, _ = sample_step(sampler, cfg, train, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sampled = time.perf_counter()
        batches = policy_batches(groups, cfg, end_id, tokenizer.pad_token_id)
        learn(state, cfg, batches, Progress(step=step), policy, None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter()
        tokens = sum(r.generation.num_new_tokens for g in groups for r in g.rollouts)
        rows.append({"sample_s": sampled - started, "train_s": done - sampled, "new_tokens": tokens})
    timed = rows[args.warmup :]
    seconds = sum(r["sample_s"] + r["train_s"] for r in timed) / len(timed)
    completions = args.prompts * args.group
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": args.arch,
        "prompts": args.prompts,
        "group": args.group,
        "tokens": args.tokens,
        "steps_timed": len(timed),
        "seconds_per_step": seconds,
        "sample_seconds_per_step": sum(r["sample_s"] for r in timed) / len(timed),
        "train_seconds_per_step": sum(r["train_s"] for r in timed) / len(timed),
        "completions_generated_and_trained_per_s": completions / seconds,
        "prompts_per_s": args.prompts / seconds,
        "new_tokens_per_s": sum(r["new_tokens"] for r in timed) / sum(r["sample_s"] for r in timed),
        "peak_cuda_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
