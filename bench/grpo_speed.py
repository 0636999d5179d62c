"""A GRPO step, tracetune against TRL's GRPOTrainer on this CPU, interleaved in one invocation.

The same model (Gemma 3 270M, pretrained: it never ends its turn, so every completion runs to the length
limit in both systems and the work is equal), the same prompts in the same chat template, prompts per step P,
group size G, completion length, temperature, one optimizer step per generated batch, bf16 autocast, AdamW,
and the same reward (tracetune's checkers). Both train on every group: tracetune's dynamic sampling would
otherwise skip the all-zero groups of a pretrained model and do less work. Each (system, repeat) is its own
process, run A B A B ...; seconds per step exclude the first --warmup steps. tracetune runs as `tracetune run`
runs, under tcmalloc where installed; TRL on the system allocator, as its users run it.

    python bench/grpo_speed.py [--steps 4] [--repeats 2] [--prompts 4] [--group 4] [--tokens 64]

Writes bench/results/grpo_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from harness import interleave, run_worker, spawn

from tracetune import allocator

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("tracetune", "trl")
LR = 1e-6


def _config(args, root: Path):
    from tracetune.config import load_config

    return load_config(
        REPO / "configs" / "reasoning_rl.yaml",
        [
            "stages=[grpo]",
            f"grpo.num_steps={args.steps}",
            f"grpo.prompts_per_step={args.prompts}",
            f"grpo.group_size={args.group}",
            f"grpo.sampling.max_new_tokens={args.tokens}",
            f"grpo.sampling.batch_size={args.prompts * args.group}",
            "grpo.sampling.temperature=1.0",
            f"grpo.lr={LR}",
            "grpo.drop_zero_variance_groups=false",
            "grpo.eval_every_steps=null",
            "grpo.save_every_steps=null",
            "train.warmup_steps=0",
            f"train.batch_size={args.prompts * args.group}",
            f"output.root={root}",
            "output.run_name=bench",
        ],
    )


def _prompts(cfg, count: int):
    from tracetune.pipeline import load_inputs

    return load_inputs(cfg).train[:count]


def worker_tracetune(args, tmp: Path) -> dict:
    from tracetune.models.sources import load_model, load_tokenizer
    from tracetune.rl.grpo import fit_grpo

    cfg = _config(args, tmp)
    train = _prompts(cfg, args.steps * args.prompts)
    tokenizer = load_tokenizer(cfg.model.source)
    model = load_model(cfg.model.source, tokenizer)
    stage_dir = tmp / "grpo"
    stage_dir.mkdir()
    fit_grpo(cfg, stage_dir, model, tokenizer, train, None)
    rows = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["sample_s"] + r["train_s"] for r in rows if "reward" in r]
    tokens = [r["mean_completion_tokens"] for r in rows if "reward" in r]
    return {"seconds_per_step": seconds, "mean_completion_tokens": tokens, "allocator": allocator.active()}


def worker_trl(args, tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tracetune.data.render import user_message
    from tracetune.data.traces import EvalItem
    from tracetune.eval.scoring import score_item
    from tracetune.models.sources import load_model, load_tokenizer
    from tracetune.rl.rewards import reward_terms, total_reward

    cfg = _config(args, tmp)
    traces = _prompts(cfg, args.steps * args.prompts)
    tokenizer = load_tokenizer(cfg.model.source)
    model = load_model(cfg.model.source, tokenizer)
    rows = [
        {
            "prompt": [{"role": "user", "content": user_message(t.prompt, cfg.data.instruction)}],
            "answer": t.final_answer,
        }
        for t in traces
    ]
    lengths = []

    def reward(completions, answer, **_):
        out = []
        for completion, expected in zip(completions, answer, strict=True):
            text = completion[0]["content"]
            lengths.append(len(tokenizer(text, add_special_tokens=False).input_ids))
            truncated = "length"  # a pretrained model runs to the limit; the reward needs no finer reason here
            out.append(
                total_reward(reward_terms(score_item(EvalItem("x", "", expected), text), truncated), cfg.grpo.reward)
            )
        return out

    config = GRPOConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=args.group,
        max_completion_length=args.tokens,
        temperature=1.0,
        learning_rate=LR,
        max_steps=args.steps,
        beta=0.0,
        num_iterations=1,
        bf16=True,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        shuffle_dataset=False,
    )
    times = [time.perf_counter()]

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.add_callback(Clock())
    trainer.train()
    seconds = [b - a for a, b in zip(times, times[1:], strict=False)]
    per_step = len(lengths) // max(1, len(seconds))
    tokens = [statistics.fmean(lengths[k * per_step : (k + 1) * per_step]) for k in range(len(seconds))]
    return {"seconds_per_step": seconds, "mean_completion_tokens": tokens, "allocator": allocator.active()}


WORKERS = {"tracetune": worker_tracetune, "trl": worker_trl}


def _spawn(system: str, args) -> dict:
    argv = ["--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group)]
    return spawn(__file__, system, [*argv, "--tokens", str(args.tokens)], tcmalloc=system == "tracetune")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="grpo_speed")
    args = parser.parse_args()
    if args.worker:
        run_worker(WORKERS[args.worker], args)
        return
    runs = interleave(SYSTEMS, args.repeats, lambda system: _spawn(system, args))
    summary = {}
    for system, results in runs.items():
        steps = [s for r in results for s in r["seconds_per_step"][args.warmup :]]
        tokens = [t for r in results for t in r["mean_completion_tokens"][args.warmup :]]
        median = statistics.median(steps)
        summary[system] = {
            "median_seconds_per_step": median,
            "prompts_per_s": args.prompts / median,
            "completions_per_s": args.prompts * args.group / median,
            "mean_completion_tokens": statistics.fmean(tokens),
            "allocator": results[0]["allocator"],
        }
    ratio = summary["tracetune"]["prompts_per_s"] / summary["trl"]["prompts_per_s"]
    settings = {k: getattr(args, k) for k in ("steps", "warmup", "repeats", "prompts", "group", "tokens")}
    result = {"settings": settings, "runs": runs, "summary": summary, "tracetune_over_trl_prompts_per_s": ratio}
    out = REPO / "bench" / "results" / args.out
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"GRPO step on {os.cpu_count()} CPU cores, Gemma 3 270M, P={args.prompts} prompts x G={args.group}, "
        f"{args.tokens} completion tokens; medians over {args.repeats} interleaved runs x {args.steps - args.warmup} steps",
        "",
        "| metric | tracetune | trl | ratio |",
        "|---|---|---|---|",
    ]
    for key in ("median_seconds_per_step", "prompts_per_s", "completions_per_s", "mean_completion_tokens"):
        a, b = summary["tracetune"][key], summary["trl"][key]
        lines.append(f"| {key} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
